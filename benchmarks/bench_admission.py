"""Admission under mixed traffic: false refusals of the shape-aware estimate against the single pace it replaced
(issue 21, item 1), side by side in one run on the CPU with the tiny built-in pair.

    python benchmarks/bench_admission.py             # 48 requests a side: 64²/1-step and 256²/12-step, 3:1
    python benchmarks/bench_admission.py --quick     # 8 requests a side: a check that it runs

First each shape's time alone is measured (median of --solo runs, no deadline). Then the same sequence of
requests goes to two servers, one at a time (nothing ever waits behind another request), alternating between
them: one server estimates with `server.scheduling.pace.Pace`, the other with the single weighted rate over
every batch that Refinery used before (`SingleRatePace` below, its old rule kept here for the comparison).
Every request's deadline is --slack times its shape's time alone, so a request refused at admission is a false
refusal: run alone, it would have finished in time. A request that ran and still missed its deadline (the
machine was slower than its solo runs) is counted apart, as late.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from unittest import mock

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_scheduler import InProcess  # the benchmarks folder: sys.path[0] when run as a script

from benchmarks._quick import parse_args
from modelstore import ModelStore, StoreSettings, parse_air
from refinery.v1 import generation_pb2 as pb
from server.core.domain import PairKey
from server.core.errors import DeadlineExceeded, Overloaded
from server.core.logs import quiet_model_libraries
from server.core.settings import DEFAULT_BASE, Settings
from server.scheduling import pace

SHAPES = {"64²/1 step": (64, 1), "256²/12 steps": (256, 12)}


class SingleRatePace(pace.Pace):
    """Refinery's estimate before issue 21: one exponentially weighted rate in megapixel-steps per second over
    every batch, whatever its shape, and no margin."""

    def __init__(self) -> None:
        super().__init__()
        self._rate_lock = threading.Lock()
        self._rate: float | None = None

    def observe(self, shape: pace.Shape, seconds: float, step_seconds: float | None) -> None:
        work = shape.pixels * shape.images * shape.steps / 1e6
        if work > 0 and seconds > 0:
            with self._rate_lock:
                rate = work / seconds
                self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate

    def seconds_for(self, shape: pace.Shape) -> float | None:
        with self._rate_lock:
            rate = self._rate
        return None if rate is None else shape.pixels * shape.images * shape.steps / 1e6 / rate

    def check(self, own: pace.Shape, ahead: Iterable[pace.Ahead], devices: int, remaining_s: float) -> None:
        alone = self.seconds_for(own)
        if alone is None:
            return
        if alone > remaining_s:
            raise DeadlineExceeded(f"the request needs about {alone:.1f}s; its deadline leaves {remaining_s:.1f}s")
        waiting = sum(s if u is None else max(0.0, min(s, u)) for s, u in ahead) / max(devices, 1)
        if alone + waiting > remaining_s:
            raise Overloaded("the requests ahead of it would make it late", retry_after_s=1.0)


def request(name: str, index: int) -> pb.GenerateRequest:
    size, steps = SHAPES[name]
    return pb.GenerateRequest(positive_prompt=f"a lighthouse {index}", width=size, height=size, steps=steps, seed=index)


def outcome(server: InProcess, name: str, index: int, deadline_s: float | None) -> str:
    try:
        list(server.stub.Generate(request(name, index), timeout=deadline_s or 600))
    except grpc.RpcError as err:
        details = err.details() or ""
        if "needs about" in details or "ahead of it" in details:
            return "refused"  # at admission, by the estimate
        if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            return "late"  # it ran, and the machine was slower than in its solo runs
        raise
    return "ok"


def solo_seconds(server: InProcess, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in SHAPES}
    for i in range(runs):
        for name in SHAPES:
            started = time.perf_counter()
            assert outcome(server, name, 1000 + i, None) == "ok"
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests a side (default 48)")
    parser.add_argument("--solo", type=int, default=5, help="runs of each shape alone, for its time (default 5)")
    parser.add_argument("--slack", type=float, default=1.5, help="deadline / time alone (default 1.5)")
    args = parse_args(parser, {"requests": 8, "solo": 1})

    quiet_model_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(StoreSettings(cache_dir=Path(tmp) / "cache"))
        pins = (PairKey(parse_air(DEFAULT_BASE), None),)
        settings = Settings(store=store.settings, host="127.0.0.1", port=0, devices=("cpu",), pins=pins, max_batch=1)
        servers = {"shape-aware (now)": InProcess(settings, store)}
        with mock.patch("server.scheduling.scheduler.Pace", SingleRatePace):
            servers["single rate (before)"] = InProcess(settings, store)
        try:
            solo = solo_seconds(servers["shape-aware (now)"], args.solo)
            print("alone: " + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in solo.items()))
            mix = ["256²/12 steps" if i % 4 == 3 else "64²/1 step" for i in range(args.requests)]
            counts = {side: Counter[str]() for side in servers}
            for i, name in enumerate(mix):
                for side, server in servers.items():  # alternating: drift in machine load hits both alike
                    counts[side][outcome(server, name, i, solo[name] * args.slack)] += 1
        finally:
            for server in servers.values():
                server.close()
    print(f"{args.requests} requests a side (3 of 64²/1 step to 1 of 256²/12 steps), deadline {args.slack}x alone")
    for side, count in counts.items():
        print(f"  {side:22} false refusals {count['refused']:3}   ok {count['ok']:3}   late {count['late']:3}")


if __name__ == "__main__":
    main()
