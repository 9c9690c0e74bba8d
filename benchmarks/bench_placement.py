"""Placement with many requests queued (issue 19, "placement that scales"): the queue and placement before
(tests/scheduler/placement_before.py: every wake-up lists the runnable requests and scans them) against after
(the queue's index, server/scheduling/runnable.py), side by side in one run, on the CPU, no models.

    python benchmarks/bench_placement.py                 # 100, 1,000 and 10,000 queued; a few minutes on 2 cores
    python benchmarks/bench_placement.py --quick         # 100 and 1,000: a check that it runs
    python benchmarks/bench_placement.py --record        # also writes benchmarks/results/placement_cpu.json

The requests need 8 pairs, at priorities 0 (80 %), 1 (15 %) and 2 (5 %), half of them with a deadline, and
batch by pair and one of two shapes, one image each. Stand-in devices hold pairs under a budget of three pairs
(loading evicts the least recently used pair no queued request needs), so placement takes each of its paths.
For each queue length n, each side:

1. fill: submitting the n requests (positions announced to each, as the server does).
2. decision, takes one: one wake-up of a free device's `take` that picks a request (which stays queued), with
   the device holding two of the pairs and a busy peer a third.
3. decision, takes none: one wake-up that finds nothing worth taking (a device too small for any pair), the
   wake-up every queue change causes while the devices are full.
4. drain: two devices taking turns (the other one busy) until the queue is empty, max batch 4, in all: with
   a position listener on every request, as the server has (each take tells every request behind it its new
   position: those calls stay, Θ(n) per take, owed to the clients), then without any.
Both sides must take the same requests in the same order; the run stops if they do not.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from server.core.domain import PairKey
from server.scheduling import placement
from server.scheduling.queue import AdmissionQueue
from tests.scheduler import placement_before as before

RESULTS = Path(__file__).resolve().parent / "results" / "placement_cpu.json"
PAIRS = [PairKey.parse(f"civitai:{i}@1+civitai:999@1") for i in range(8)]
PAIR_BYTES = 4
BUDGET = 3 * PAIR_BYTES


@dataclass(frozen=True)
class Spec:
    key: PairKey
    size: int = PAIR_BYTES


@dataclass(eq=False)
class Request:
    name: str
    spec: Spec
    images: int = 1


@dataclass
class Residency:
    """Pairs held in least-recently-used order under a budget; what placement reads of a device."""

    budget: int = BUDGET
    held: dict[PairKey, int] = field(default_factory=dict)

    def holds(self, key: PairKey) -> bool:
        return key in self.held

    def load_cost(self, spec: Spec) -> int:
        return 0 if spec.key in self.held else spec.size

    def fits(self, spec: Spec, protected: set[PairKey]) -> bool:
        if spec.key in self.held:
            return True
        evictable = sum(size for key, size in self.held.items() if key not in protected)
        return spec.size <= self.budget - sum(self.held.values()) + evictable

    def load(self, spec: Spec, protected: set[Any]) -> None:
        """Make `spec` resident, most recently used; evict idle pairs no queued request needs, oldest first
        (then any, oldest first: a stand-in must never refuse)."""
        self.held.pop(spec.key, None)
        for spare in ([k for k in self.held if k not in protected], list(self.held)):
            for key in spare:
                if sum(self.held.values()) + spec.size <= self.budget:
                    break
                del self.held[key]
        self.held[spec.key] = spec.size


@dataclass
class Device:
    residency: Residency = field(default_factory=Residency)
    busy: bool = False


@dataclass(frozen=True)
class Side:
    """One implementation: how to make its queue and how a device's wake-up asks its placement."""

    name: str
    queue: Callable[[int], Any]
    choose: Callable[[Device, list[Device], Any, float], Any]


SIDES = [
    Side("before", lambda n: before.AdmissionQueue[Request](n), before.choose),  # type: ignore[arg-type]
    Side("after", lambda n: AdmissionQueue[Request](n, group=placement.group), placement.choose),  # type: ignore[arg-type]
]


def workload(n: int, seed: int) -> list[tuple[Request, dict[str, Any]]]:
    rng = random.Random(seed)
    work = []
    for i in range(n):
        spec = Spec(rng.choice(PAIRS))
        options = {
            "priority": rng.choices([0, 1, 2], weights=[80, 15, 5])[0],
            "pair": spec.key,
            "batch_key": (spec.key, rng.randint(1, 2)),
            "deadline": None if rng.random() < 0.5 else 1e9 + rng.random(),  # far off: none passes here
        }
        work.append((Request(f"r{i}", spec), options))
    return work


def fill(side: Side, work: list[tuple[Request, dict[str, Any]]], *, listen: bool) -> tuple[Any, float]:
    queue = side.queue(len(work))
    heard = [0]

    def on_position(_position: int, _depth: int) -> None:
        heard[0] += 1

    started = time.perf_counter()
    for request, options in work:
        queue.submit(request, on_position=on_position if listen else None, **options)
    return queue, time.perf_counter() - started


def per_decision_s(
    side: Side, queue: Any, device: Device, peers: list[Device], *, min_s: float
) -> tuple[float, Request | None]:
    """Mean seconds of one wake-up of `take` whose chooser runs placement and then takes nothing (at least once,
    then again until `min_s` has passed), and the request placement picked."""
    answers = []

    def wake_up(runnable: Any) -> None:
        answers.append(side.choose(device, peers, runnable, 0.0))

    count, started = 0, time.perf_counter()
    while count < 1 or time.perf_counter() - started < min_s:
        queue.take(wake_up, timeout=0)
        count += 1
    assert len({id(a) for a in answers}) == 1, "the same queue gave different answers"
    return (time.perf_counter() - started) / count, None if answers[0] is None else answers[0].item


def decision_worlds() -> dict[str, tuple[Device, list[Device]]]:
    holding = Device(Residency(held={PAIRS[0]: PAIR_BYTES, PAIRS[1]: PAIR_BYTES}))
    peer = Device(Residency(held={PAIRS[2]: PAIR_BYTES}), busy=True)
    too_small = Device(Residency(budget=PAIR_BYTES - 1))
    return {"takes one": (holding, [peer]), "takes none": (too_small, [peer])}


def drain(side: Side, queue: Any) -> tuple[float, list[str]]:
    """Two devices take turns until the queue is empty; seconds in all and the names taken, by take."""
    devices = [Device(), Device()]
    taken: list[str] = []
    takes, idle, turn = 0, 0, 0
    started = time.perf_counter()
    while queue.depth() and idle < len(devices):
        device, peer = devices[turn % 2], devices[(turn + 1) % 2]
        turn += 1
        peer.busy = True

        def pick(runnable: Any, device: Device = device, peer: Device = peer) -> Any:
            return side.choose(device, [peer], runnable, 0.0)

        batch = queue.take(pick, max_batch=4, weight=lambda r: r.images, timeout=0)
        takes += 1
        idle = 0 if batch else idle + 1
        if batch:  # the chosen request comes first
            device.residency.load(batch[0].spec, queue.waiting_pairs())
            taken.append(" ".join(r.name for r in batch))
    assert not queue.depth(), f"{side.name}: {queue.depth()} requests left that no device would take"
    return time.perf_counter() - started, taken


def measure(n: int, *, seed: int, min_s: float) -> dict[str, dict[str, float]]:
    """Every figure for one queue length, each side's beside the other's."""
    work = workload(n, seed)
    figures: dict[str, dict[str, float]] = {}
    orders: dict[str, list[Any]] = {}
    for side in SIDES:
        queue, fill_s = fill(side, work, listen=True)
        row = {"fill_s": fill_s}
        picked = []
        for name, (device, peers) in decision_worlds().items():
            row[f"decision {name}_s"], answer = per_decision_s(side, queue, device, peers, min_s=min_s)
            picked.append(answer)
        row["drain, listening_s"], listening = drain(side, queue)
        quiet, _ = fill(side, work, listen=False)
        row["drain_s"], alone = drain(side, quiet)
        orders[side.name] = [picked, listening, alone]
        row["takes"] = len(alone)
        figures[side.name] = row
        shown = ", ".join(f"{k.removesuffix('_s')} {_ms(v)}" for k, v in row.items() if k.endswith("_s"))
        print(f"  n={n:>6} {side.name:>6}: {shown}, {row['takes']} takes", flush=True)
    assert orders["before"] == orders["after"], f"n={n}: before and after picked different requests"
    return figures


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    keys = [k for k in next(iter(results.values()))["before"] if k.endswith("_s")]
    lines = ["| queued | " + " | ".join(k.removesuffix("_s") for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for n, figures in results.items():
        cells = []
        for key in keys:
            old, new = figures["before"][key], figures["after"][key]
            ratio = old / new
            cells.append(
                f"{_ms(old)} → {_ms(new)} ({ratio:.1f}×)" if ratio < 10 else f"{_ms(old)} → {_ms(new)} ({ratio:,.0f}×)"
            )
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="queue lengths")
    parser.add_argument("--min-s", type=float, default=0.5, help="least seconds spent timing each decision")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--record", action="store_true", help=f"write the figures to {RESULTS}")
    args = parse_args(parser, {"sizes": [100, 1000], "min_s": 0.01})
    results = {n: measure(n, seed=args.seed, min_s=args.min_s) for n in args.sizes}
    print(table(results))
    print("takes to drain:", ", ".join(f"{f['after']['takes']:,.0f} for {n:,}" for n, f in results.items()))
    if args.record and not args.quick:
        RESULTS.write_text(json.dumps({"sizes": {str(n): f for n, f in results.items()}}, indent=2) + "\n")
        print(f"recorded in {RESULTS}")
    speedups = [f["before"]["decision takes one_s"] / f["after"]["decision takes one_s"] for f in results.values()]
    print(f"decision speed-up, median over sizes: {statistics.median(speedups):.0f}×")


if __name__ == "__main__":
    main()
