"""How long `ModelStore.resolve` takes for a model that is already cached (the per-request cost).

    python benchmarks/bench_resolve.py [--n 2000]
    python benchmarks/bench_resolve.py --quick         # n=50: a check that it runs

Times `resolve` (index read, file checks, last-used update) and `lookup` (the same without the update) for a
single-file civitai checkpoint and for the built-in diffusers-layout SDXL base (14 files), each in a fresh
process's store over a warm cache. Prints median / p90 / p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loopback import LoopbackServer, write_checkpoint
from benchmarks._quick import parse_args
from modelstore import ModelStore, StoreSettings


def timings(call: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(100, n)):  # warm up
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return sorted(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parse_args(parser, {"n": 50})
    with tempfile.TemporaryDirectory(prefix="bench-resolve-") as tmp:
        root = Path(tmp)
        source = root / "model.safetensors"
        server = LoopbackServer(source, write_checkpoint(source, 4 << 20))
        settings = StoreSettings(cache_dir=root / "cache", civitai_api=server.url)
        try:
            warm = ModelStore(settings)
            warm.resolve("civitai:1@2")
            warm.resolve("builtin:tiny-sdxl-base@1")
            warm.close()
        finally:
            server.close()
        store = ModelStore(StoreSettings(cache_dir=root / "cache", offline=True))  # no network from here on
        print(f"{'':<44}{'median':>8}{'p90':>8}{'p99':>8}   (ms, n={args.n})")
        for model in ("civitai:1@2", "builtin:tiny-sdxl-base@1"):
            for name, call in (("resolve", store.resolve), ("lookup", store.lookup)):
                samples = timings(lambda call=call, model=model: call(model), args.n)
                p90, p99 = samples[int(0.9 * len(samples))], samples[int(0.99 * len(samples))]
                print(f"{name + ' ' + model:<44}{statistics.median(samples):>8.3f}{p90:>8.3f}{p99:>8.3f}")
        store.close()


if __name__ == "__main__":
    main()
