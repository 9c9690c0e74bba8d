"""What compare saves: one `Refiner.compare` request against the two requests it replaces (the same seed with
the refiner, and without one), on the CPU with the tiny built-in pair.

    python benchmarks/bench_compare.py                  # 64x64, 30 steps, refiner from 90 %: 27 + 3
    python benchmarks/bench_compare.py --reps 20 --refiner-start 85
    python benchmarks/bench_compare.py --quick          # 10 steps, one run: a check that it runs

Both sides go through gRPC to one in-process server (models pinned, `--max-batch 1` so nothing batches), and
run interleaved (compare, then the two separate requests back to back, ...) after a warm-up, so drift in
machine load hits both alike. UNet calls are counted by forward hooks on the UNets the server loaded, not
derived from the step counts; with classifier-free guidance each step is one call on a doubled batch. Every
run also checks that the compare request's two images equal the separate requests' pixel for pixel.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_scheduler import InProcess  # the benchmarks folder: sys.path[0] when run as a script

from benchmarks._quick import parse_args
from modelstore import ModelRecord, ModelStore, Role, StoreSettings, load_pipeline, parse_air
from refinery.v1 import generation_pb2 as pb
from server.core.domain import PairKey
from server.core.logs import quiet_model_libraries
from server.core.settings import DEFAULT_BASE, DEFAULT_REFINER, Settings
from server.generation.split import StartPercentage, base_step_count

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky"


class CountingLoader:
    """The real loader, with a forward hook on every UNet it hands out (once per module: a UNet shared by two
    pipelines is still one model doing one call)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._hooked: set[int] = set()

    def __call__(self, record: ModelRecord, *, role: Role, **kwargs: Any) -> Any:
        pipe = load_pipeline(record, role=role, **kwargs)
        if id(pipe.unet) not in self._hooked:
            self._hooked.add(id(pipe.unet))
            name = Role(role).value
            pipe.unet.register_forward_hook(lambda *_: self._count(name))
        return pipe

    def _count(self, role: str) -> None:
        with self._lock:
            self.calls[role] += 1

    def take(self) -> Counter[str]:
        """The calls counted since the last `take`."""
        with self._lock:
            calls, self.calls = self.calls, Counter()
        return calls


def requests(args: argparse.Namespace) -> tuple[pb.GenerateRequest, pb.GenerateRequest, pb.GenerateRequest]:
    """The compare request, and the two it replaces."""
    common: dict[str, Any] = {"positive_prompt": PROMPT, "steps": args.steps, "seed": 7, "cfg_scale": 7.0}
    common |= {"width": args.size, "height": args.size}
    start = pb.Refiner(start_step_percentage=args.refiner_start)
    compare = pb.GenerateRequest(**common, refiner=pb.Refiner(start_step_percentage=args.refiner_start, compare=True))
    return compare, pb.GenerateRequest(**common, refiner=start), pb.GenerateRequest(**common)


def pixels(response: pb.GenerateResponse) -> bytes:
    with Image.open(io.BytesIO(response.image.data)) as image:
        return image.convert("RGB").tobytes()


def measure(server: InProcess, loader: CountingLoader, args: argparse.Namespace) -> dict[str, Any]:
    compare, refined, plain = requests(args)
    for _ in range(args.warmup):
        for message in (compare, refined, plain):
            server.generate(message)
    loader.take()
    times: dict[str, list[float]] = {"compare": [], "separate": []}
    calls: dict[str, Counter[str]] = {"compare": Counter(), "separate": Counter()}
    identical = True
    for _ in range(args.reps):
        started = time.perf_counter()
        together = [r for r in server.generate(compare) if r.WhichOneof("event") == "image"]
        times["compare"].append(time.perf_counter() - started)
        calls["compare"] += loader.take()
        started = time.perf_counter()
        apart = [server.generate(refined)[-1], server.generate(plain)[-1]]
        times["separate"].append(time.perf_counter() - started)
        calls["separate"] += loader.take()
        # Compare sends the base-only image first, then the refined one.
        identical = identical and [pixels(r) for r in together] == [pixels(apart[1]), pixels(apart[0])]
    return {"times": times, "calls": calls, "identical": identical}


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    base_steps = base_step_count(args.steps, StartPercentage(args.refiner_start))
    times, calls = result["times"], result["calls"]
    print(
        f"{args.size}x{args.size}, {args.steps} steps, refiner from {args.refiner_start} % "
        f"({base_steps} + {args.steps - base_steps}), Euler, cfg 7; CPU; "
        f"{args.reps} interleaved runs each after {args.warmup} warm-up"
    )
    print(f"{'':<44} {'median ms':>9} {'min ms':>9} {'UNet calls (base + refiner)':>28}")
    rows = [("one compare request", "compare"), ("two requests (refined, then no refiner)", "separate")]
    for label, key in rows:
        per_run = {role: count // args.reps for role, count in calls[key].items()}
        unet = f"{sum(per_run.values())} ({per_run.get('base', 0)} + {per_run.get('refiner', 0)})"
        print(f"{label:<44} {statistics.median(times[key]) * 1000:>9.1f} {min(times[key]) * 1000:>9.1f} {unet:>28}")
    ratio = statistics.median(times["compare"]) / statistics.median(times["separate"])
    call_ratio = sum(calls["compare"].values()) / sum(calls["separate"].values())
    print(f"ratio compare / separate: wall time (medians) {ratio:.3f}, UNet calls {call_ratio:.3f}")
    identical = "yes" if result["identical"] else "NO"
    print(f"compare's two images equal the separate requests' pixel for pixel: {identical}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="timed runs of each side (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each side first (default 2)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--refiner-start", type=int, default=90, help="percent (default 90)")
    parser.add_argument("--size", type=int, default=64)
    args = parse_args(parser, {"reps": 1, "warmup": 0, "steps": 10})

    quiet_model_libraries()
    loader = CountingLoader()
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(StoreSettings(cache_dir=Path(tmp) / "cache"))
        base, refiner = parse_air(DEFAULT_BASE), parse_air(DEFAULT_REFINER)
        pins = (PairKey(base, refiner), PairKey(base, None))
        settings = Settings(store=store.settings, host="127.0.0.1", port=0, devices=("cpu",), pins=pins, max_batch=1)
        server = InProcess(settings, store, loader=loader)
        try:
            result = measure(server, loader, args)
        finally:
            server.close()
    report(result, args)


if __name__ == "__main__":
    main()
