"""What encoding results off the device worker buys under load: the same burst of concurrent requests against
two servers side by side, one with `--encode-threads 0` (PNG encoded on the device's worker thread, the device
idle meanwhile) and one with the default `--encode-threads 2` (the device denoises the next batch while the
last one is encoded).

    python benchmarks/gpu_encode_overlap.py                      # full size on cuda:0, 1024x1024, 30 steps
    python benchmarks/gpu_encode_overlap.py --tiny --device cpu  # the same flow on the tiny models (dry run)
    python benchmarks/gpu_encode_overlap.py --quick              # that, 2 requests, 10 steps: does it run

Both servers load the same random-weight SDXL base and refiner (benchmarks/_random_sdxl.py) on one GPU, with
`--max-batch 1` so that every request is its own batch; bursts alternate between them, so both see the same
machine. Prints images per second for each and their ratio, and writes them as JSON to $OUT when it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from benchmarks._service import Service, log
from benchmarks.gpu_sdxl import build_pair


def burst(service: Service, n: int, size: int, steps: int) -> float:
    """Images per second for `n` one-image requests sent at once."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        for _ in pool.map(lambda _: service.generate(size, steps), range(n)):
            pass
    return n / (time.perf_counter() - started)


def start_services(
    folders: dict[str, Path], args: argparse.Namespace, workdir: Path, flags: list[str]
) -> dict[str, Service]:
    """The two servers, started at once; if one fails to start, the other is closed before the error rises."""
    configs = {"inline": ["--encode-threads", "0"], "overlapped": ["--encode-threads", "2"]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {
            name: pool.submit(Service, folders, args.device, workdir / f"cache-{name}", [*flags, *own])
            for name, own in configs.items()
        }
    failed = [error for future in started.values() if (error := future.exception()) is not None]
    if failed:
        for future in started.values():
            if future.exception() is None:
                future.result().close()
        raise failed[0]
    return {name: future.result() for name, future in started.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny built-in models (a CPU dry run)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--size", type=int, default=None, help="default 1024 (64 with --tiny)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--requests", type=int, default=8, help="requests per burst")
    parser.add_argument("--reps", type=int, default=2, help="bursts per server")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parse_args(parser, {"tiny": True, "device": "cpu", "steps": 10, "requests": 2, "reps": 1})
    size = args.size or (64 if args.tiny else 1024)
    args.smoke = args.tiny
    budget = ["--budget", "45MB" if args.tiny else "14GiB", "--pin", "none", "--max-batch", "1"]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    log(f"{device}, {size}x{size}, {args.steps} steps, bursts of {args.requests} requests")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refinery-overlap-"))
    folders = build_pair(workdir / "models", args)

    services = start_services(folders, args, workdir, budget)
    rates: dict[str, list[float]] = {name: [] for name in services}
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            # Register, hash and load the pair in both at once (this is also the warm-up).
            for _ in pool.map(lambda s: s.generate(size, args.steps), services.values()):
                pass
        for rep in range(args.reps):
            for name, service in services.items():
                rates[name].append(burst(service, args.requests, size, args.steps))
                log(f"rep {rep + 1}, {name}: {rates[name][-1]:.3f} images/s")
    finally:
        for service in services.values():
            service.close()

    results = {
        "device": device,
        "size": size,
        "steps": args.steps,
        "requests_per_burst": args.requests,
        **{f"{name}_images_per_s": statistics.median(r) for name, r in rates.items()},
        **{f"{name}_bursts": r for name, r in rates.items()},
    }
    results["ratio"] = results["overlapped_images_per_s"] / results["inline_images_per_s"]
    print(f"\n{device} · {size}x{size} · {args.steps} steps · {args.requests} concurrent one-image requests")
    print(f"  encode on the device's worker (--encode-threads 0)  {results['inline_images_per_s']:.3f} images/s")
    print(f"  encode beside it (--encode-threads 2)               {results['overlapped_images_per_s']:.3f} images/s")
    print(f"  ratio                                               {results['ratio']:.3f}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_encode_overlap.json").write_text(json.dumps(results, indent=2))
    if args.quick and args.workdir is None:
        shutil.rmtree(workdir)  # a check leaves nothing behind


if __name__ == "__main__":
    main()
