"""Pair affinity against round-robin on the local fleet: 3 `refinery serve` replicas behind nginx, 3 tiny
pairs, one fixed random request mix sent through each balancer in turn, side by side.

    .venv/bin/python benchmarks/bench_fleet.py [--requests 120] [--clients 3] [--seed 11] [--json PATH]
    .venv/bin/python benchmarks/bench_fleet.py --quick     # 12 requests: a check that it runs
    .venv/bin/python benchmarks/bench_fleet.py --lost [--sigterm-runs 12]   # a replica lost under load

Each replica's budget holds two of the three pairs but not all three (measured from a replica's
`refinery_resident_bytes`, as the fleet tests do). Each policy gets a fresh fleet (nothing resident), one
warm-up call per pair, then the same mix. Reported per policy:

- warm hits: requests after warm-up that found their pair resident, from model loads counted by the replicas
  (`refinery_model_load_seconds_count`): 1 - loads / requests;
- model loads and evictions after warm-up (`refinery_eviction_seconds_count`);
- requests per second over the mix, and p50/p99 latency of one call (end to end, through nginx).

`--lost` measures instead what losing replicas costs callers, with the Python client's resend off and on
(a fresh fleet each: 3 replicas, round-robin, one tiny pair, 2 steps, 3 clients sending one call after
another): `--sigterm-runs` SIGTERMs under arrivals, each replica restarted, then a replica frozen and killed
-9 (deploy/local/outage.py). Reported: calls lost (failed before the caller saw an event), cut (failed after
events: never resent), resends and the calls they saved, the extra latency of a resent call, and the steps a
cut call had run (what a resend of it would repeat).

Needs nginx (Debian nginx-light). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from deploy.local import sizing
from deploy.local.fleet import Fleet, FleetSettings
from deploy.local.outage import hang_then_kill, sigterm_cycles
from deploy.local.steady import POLICY, Steady
from deploy.local.traffic import CHANNEL_OPTIONS, Outcome, Pair, generate, generation_stub, mix

PAIRS = (
    Pair("builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-refiner@1"),
    Pair("builtin:tiny-sdxl-base@2"),
    Pair("builtin:tiny-sdxl-base@3"),
)
PAIRS_PER_REPLICA = 2


@dataclass(frozen=True)
class Result:
    policy: str
    requests: int
    failed: int
    warm_hit_ratio: float
    model_loads: int
    evictions: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    loaded_in_stream: int  # calls whose stream showed a model loading (the client's view of a miss)


def run(policy: str, settings: FleetSettings, requests: list[Pair], clients: int) -> Result:
    with Fleet(settings) as fleet, grpc.insecure_channel(fleet.front, options=CHANNEL_OPTIONS) as channel:
        stub = generation_stub(channel)
        for pair in PAIRS:  # warm-up: each pair once
            if not (outcome := generate(stub, pair)).ok:
                raise RuntimeError(f"warm-up of {pair} failed: {outcome.code.name}: {outcome.details}")

        def counter(name: str) -> float:
            return sum(r.total(name) for r in fleet.replicas)

        loads0 = counter("refinery_model_load_seconds_count")
        evictions0 = counter("refinery_eviction_seconds_count")
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            outcomes: list[Outcome] = list(
                pool.map(lambda job: generate(stub, job[1], seed=job[0]), enumerate(requests))
            )
        elapsed = time.monotonic() - started
        loads = int(counter("refinery_model_load_seconds_count") - loads0)
        evictions = int(counter("refinery_eviction_seconds_count") - evictions0)
    latencies = sorted(o.seconds * 1000 for o in outcomes if o.ok)
    return Result(
        policy=policy,
        requests=len(requests),
        failed=sum(not o.ok for o in outcomes),
        warm_hit_ratio=1 - loads / len(requests),
        model_loads=loads,
        evictions=evictions,
        requests_per_s=len(requests) / elapsed,
        p50_ms=statistics.median(latencies),
        p99_ms=statistics.quantiles(latencies, n=100)[98],
        loaded_in_stream=sum(o.loaded for o in outcomes),
    )


@dataclass(frozen=True)
class LostResult:
    resend: str
    sigterm_runs: int
    calls: int
    lost: int
    cut: int
    resends: int
    calls_resent: int
    resent_p50_ms: float  # a resent call, end to end
    plain_p50_ms: float  # a call sent once, end to end
    cut_steps_done: float  # mean denoising steps a cut call had shown
    seconds: float


def run_lost(resend: bool, root: Path, cache: Path, budget: int, runs: int) -> LostResult:
    """Steady calls through a fresh fleet while replicas are stopped (SIGTERM, restarted) and one is killed."""
    settings = FleetSettings(
        replicas=3,
        budget=str(budget),
        grace_s=5.0,
        affinity=False,
        run_dir=root / f"lost-{'resend' if resend else 'once'}",
        cache_dir=cache,
        env={"REFINERY_DRAIN_DELAY": "0"},
    )
    started = time.monotonic()
    with Fleet(settings) as fleet:
        steady = Steady(fleet.front, PAIRS[1].model, policy=POLICY if resend else None).start()
        try:
            sigterm_cycles(fleet, runs)
            before = len(steady.calls)
            hang_then_kill(fleet.replicas[0])
            steady.wait_for(lambda: len(steady.calls) >= before + 20)
        finally:
            steady.stop()
    resent = steady.resends_by_call()

    def p50(calls: list[float]) -> float:
        return statistics.median(calls) * 1000 if calls else float("nan")

    cut = steady.cut()
    return LostResult(
        resend="on" if resend else "off",
        sigterm_runs=runs,
        calls=len(steady.calls),
        lost=len(steady.lost()),
        cut=len(cut),
        resends=len(steady.resent),
        calls_resent=len(resent),
        resent_p50_ms=p50([c.seconds for c in steady.calls if c.request_id in resent and c.ok]),
        plain_p50_ms=p50([c.seconds for c in steady.calls if c.request_id not in resent and c.ok]),
        cut_steps_done=statistics.mean(c.steps_done for c in cut) if cut else 0.0,
        seconds=time.monotonic() - started,
    )


def main_lost(args: argparse.Namespace, root: Path, cache: Path, budget: int) -> int:
    results = [run_lost(resend, root, cache, budget, args.sigterm_runs) for resend in (False, True)]
    print(f"\nreplica lost under load: {args.sigterm_runs} SIGTERM runs then a kill -9 of a hung replica\n")
    print("| resend | calls | lost | cut | resends (calls) | p50 resent / once | steps a cut call had run | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.resend} | {r.calls} | {r.lost} | {r.cut} | {r.resends} ({r.calls_resent}) | "
            f"{r.resent_p50_ms:.0f} / {r.plain_p50_ms:.0f} ms | {r.cut_steps_done:.1f} of 2 | {r.seconds:.0f} s |"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--clients", type=int, default=3, help="concurrent callers")
    parser.add_argument("--seed", type=int, default=11, help="the request mix (the same for both policies)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--lost", action="store_true", help="measure a replica lost under load instead")
    parser.add_argument("--sigterm-runs", type=int, default=12, help="with --lost: SIGTERMs under arrivals")
    args = parse_args(parser, {"requests": 12, "sigterm_runs": 1})

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        root = Path(tmp)
        cache = root / "cache"
        sizes = sizing.measure(PAIRS, cache, root)
        budget = sizing.budget_for(sizes, PAIRS_PER_REPLICA)
        print("pair sizes: " + ", ".join(f"{p.key} {s / 1e6:.1f} MB" for p, s in sizes.items()))
        print(f"budget per replica: {budget / 1e6:.1f} MB (any {PAIRS_PER_REPLICA} pairs, never all 3)")
        if args.lost:
            return main_lost(args, root, cache, budget)
        requests = mix(PAIRS, args.requests, args.seed)
        results = []
        for policy, affinity in (("affinity (hash on refinery-pair)", True), ("round-robin", False)):
            settings = FleetSettings(
                replicas=3,
                budget=str(budget),
                affinity=affinity,
                run_dir=root / ("affinity" if affinity else "round-robin"),
                cache_dir=cache,
                # The same rule for both: replica names whose ring spreads the 3 pairs within each budget.
                spread=tuple(p.key for p in PAIRS),
                per_replica=PAIRS_PER_REPLICA,
            )
            results.append(run(policy, settings, requests, args.clients))

    print(f"\n{args.requests} requests (seed {args.seed}), {args.clients} clients, 64x64, 4 steps, after warm-up:\n")
    print("| | " + " | ".join(r.policy for r in results) + " |")
    print("| --- |" + " --- |" * len(results))
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("warm hits (1 - loads / requests)", lambda r: f"{r.warm_hit_ratio:.1%}"),
        ("model loads", lambda r: str(r.model_loads)),
        ("evictions", lambda r: str(r.evictions)),
        ("calls whose stream showed a load", lambda r: str(r.loaded_in_stream)),
        ("requests/s", lambda r: f"{r.requests_per_s:.2f}"),
        ("p50 latency", lambda r: f"{r.p50_ms:.0f} ms"),
        ("p99 latency", lambda r: f"{r.p99_ms:.0f} ms"),
        ("failed calls", lambda r: str(r.failed)),
    ]
    for name, cell in rows:
        print(f"| {name} | " + " | ".join(cell(r) for r in results) + " |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
