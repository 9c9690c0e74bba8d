"""What the safe opening of local models costs per request (issue 21, items 5 and 6).

Side by side, for one request naming a local model under an allowed root:

- `name check`: the edge check before the change: `os.path.realpath` of the path and a prefix test (nothing
  opened; the store later opened files by name);
- `safe open`: `server.api.local_models.canonical`: the path resolved once and opened below its root with
  O_NOFOLLOW, and for a diffusers folder every file the loader reads resolved, checked against the roots,
  opened and fstat-ed (nothing read).

On a single tiny .safetensors file and on a diffusers folder laid out like SDXL's (tiny files, 19 of them).

    .venv/bin/python benchmarks/bench_local_open.py            # 2000 requests each
    .venv/bin/python benchmarks/bench_local_open.py --quick    # 50: a check that it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._quick import parse_args
from server.api.local_models import canonical

_COMPONENTS = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "text_encoder_2": ("config.json", "model.safetensors"),
    "tokenizer": ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"),
    "tokenizer_2": ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"),
    "scheduler": ("scheduler_config.json",),
}


def name_check(text: str, roots: list[Path]) -> bool:
    """The check as it was: where the name leads, compared with the roots."""
    target = os.path.realpath(text)
    for root in roots:
        base = os.path.realpath(root)
        if target == base or target.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def per_request_us(check: Callable[[str, list[Path]], object], text: str, roots: list[Path], n: int) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        assert check(text, roots)
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests timed per case")
    args = parse_args(parser, {"requests": 50})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        single = root / "tiny.safetensors"
        folder = root / "sdxl"
        (folder / "unet").mkdir(parents=True)
        single.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        (folder / "model_index.json").write_text("{}")
        for component, files in _COMPONENTS.items():
            (folder / component).mkdir(exist_ok=True)
            for name in files:
                (folder / component / name).write_bytes(b"{}")
        print(f"{'case':<22} {'name check':>12} {'safe open':>12} {'extra':>10}   (median per request)")
        for label, path in (("single file", single), ("diffusers folder", folder)):
            before = per_request_us(name_check, str(path), [root], args.requests)
            after = per_request_us(canonical, f"local:{path}", [root], args.requests)
            print(f"{label:<22} {before:>10.1f}us {after:>10.1f}us {after - before:>8.1f}us")


if __name__ == "__main__":
    main()
