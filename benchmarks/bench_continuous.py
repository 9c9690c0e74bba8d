"""Static against continuous (step-level) batching under open-loop load (issue 19), through two real `refinery
serve` processes on loopback gRPC, on the CPU with the tiny built-in pair.

    python benchmarks/bench_continuous.py              # 200 requests per load and mode: about 25 min on 2 cores
    python benchmarks/bench_continuous.py --quick      # a few short requests: a check that it runs; records nothing

Two servers, the same flags but `--batching` (`--max-batch 4`, `--max-queue 256` so that no request is refused
for a full queue: what is measured is waiting, not admission), both alive through the run:

1. Capacity: the static server's requests/s under the workload's mix, saturated by a closed loop of
   `--concurrency` callers (the continuous server's too, for information).
2. For each load (50 %, 80 %, 100 % of the static capacity): Poisson arrivals (exponential gaps from a fixed
   seed, one pattern scaled to each rate), the same request list and schedule for both servers, the two modes
   in alternating order from load to load so that drift in machine load hits both alike. Requests: 64x64 (the
   tiny models' native size), steps uniform in 20..40, the refiner from 70..95 % (10 % without a refiner), one
   image each (10 % with two), guidance 7, Euler, a seed each. Few of these share a static batch (one needs the
   same steps, refiner start and pair); step-level batching runs them together whatever their steps.
3. Per mode and load: p50/p99 time to first step (request sent to its first Progress event), p50/p99 end to
   end (sent to its last image), throughput (completed per second from the first send to the last image),
   requests failed (must be 0), and how late the client sent against the schedule. Then continuous / static,
   against the issue's goals: p50 end to end at 80 % load <= 0.6x static, p99 <= 0.8x, throughput at 100 %
   >= static.

Figures go to benchmarks/results/continuous_cpu.json (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._arrivals import Call, Mix, closed_loop, open_loop, summary, unit_poisson
from benchmarks._quick import parse_args
from benchmarks._report import RESULTS
from benchmarks._service import Service, log, median_timings
from benchmarks.bench_loras import tiny_pair
from refinery.v1 import generation_pb2 as pb

MODES = ("static", "continuous")
# The goals: (load %, figure, bound, whether continuous / static must be at most the bound).
GOALS = (
    (80, "end_to_end_p50_s", 0.6, True),
    (80, "end_to_end_p99_s", 0.8, True),
    (100, "throughput_rps", 1.0, False),
)
RATIOS = ("first_step_p50_s", "first_step_p99_s", "end_to_end_p50_s", "end_to_end_p99_s", "throughput_rps")


def caller(service: Service) -> Call:
    return lambda request: service.stub.Generate(request, timeout=1800)


def warm_up(service: Service, mix: Mix) -> None:
    """One request of each kind the mix sends (with the refiner, without, two images), so nothing measured
    loads anything."""
    kinds = [
        pb.GenerateRequest(positive_prompt="warm", width=mix.size, height=mix.size, steps=mix.steps_min),
        pb.GenerateRequest(positive_prompt="warm", width=mix.size, height=mix.size, steps=mix.steps_min,
                           refiner=pb.Refiner(start_step_percentage=mix.start_min)),
        pb.GenerateRequest(positive_prompt="warm", width=mix.size, height=mix.size, steps=mix.steps_min,
                           refiner=pb.Refiner(start_step_percentage=mix.start_max), number_results=2),
    ]  # fmt: skip
    outcomes = open_loop(caller(service), kinds, [0.0] * len(kinds))
    failed = [o.error for o in outcomes if not o.ok]
    assert not failed, f"warm-up failed: {failed}; the server's log ends:\n{service.log_tail()}"


def capacity(services: dict[str, Service], mix: Mix, args: argparse.Namespace) -> dict[str, Any]:
    """Requests/s of each server saturated by a closed loop of `args.concurrency` callers (its own requests,
    drawn from the same mix with another seed)."""
    figures = {}
    requests = mix.requests(args.capacity_requests, args.seed + 1)
    for mode, service in services.items():
        log(f"capacity: {mode}, {len(requests)} requests, {args.concurrency} callers")
        rate, failed = closed_loop(caller(service), requests, args.concurrency)
        assert not failed, f"{failed} requests failed; the server's log ends:\n{service.log_tail()}"
        figures[mode] = {"requests_per_s": round(rate, 4)}
    return figures


def loads(services: dict[str, Service], mix: Mix, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """Each load: both modes through the same requests and arrival schedule, alternating which goes first."""
    requests = mix.requests(args.requests, args.seed)
    unit = unit_poisson(args.requests, args.seed)
    figures: dict[str, Any] = {}
    for i, load in enumerate(args.loads):
        per_s = rate * load / 100
        arrivals = [t / per_s for t in unit]
        row: dict[str, Any] = {"rate_rps": round(per_s, 4)}
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            service = services[mode]
            log(f"load {load} %: {mode}, {len(requests)} requests at {per_s:.3f}/s")
            service.timings()
            row[mode] = summary(open_loop(caller(service), requests, arrivals))
            row[mode]["server_stages_s"] = median_timings(service.timings())
        row["continuous_over_static"] = {
            key: round(row["continuous"][key] / row["static"][key], 3) for key in RATIOS if row["static"][key]
        }
        figures[str(load)] = row
    return figures


def goals(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the issue's goals whose load was run: the ratio measured and whether it is met."""
    checked = []
    for load, key, bound, at_most in GOALS:
        ratio = figures["loads"].get(str(load), {}).get("continuous_over_static", {}).get(key)
        if ratio is not None:
            met = ratio <= bound if at_most else ratio >= bound
            sense = "<=" if at_most else ">="
            checked.append({"load": load, "figure": key, "ratio": ratio, "goal": f"{sense} {bound}", "met": met})
    return checked


def report(figures: dict[str, Any]) -> None:
    cap = figures["capacity"]
    print(f"\ncapacity (closed loop): static {cap['static']['requests_per_s']:.3f} requests/s, "
          f"continuous {cap['continuous']['requests_per_s']:.3f} requests/s")  # fmt: skip
    head = ("first p50", "first p99", "e2e p50", "e2e p99", "req/s", "failed", "late max")
    print(f"\n{'load':>5} {'rate/s':>7} {'mode':<11}" + "".join(f"{h:>10}" for h in head))
    for load, row in figures["loads"].items():
        for mode in MODES:
            s = row[mode]
            values = [s[k] for k in ("first_step_p50_s", "first_step_p99_s", "end_to_end_p50_s", "end_to_end_p99_s")]
            cells = "".join(f"{v:>9.3f}s" for v in values)
            cells += f"{s['throughput_rps']:>10.3f}{s['failed']:>10}{s['send_late_max_ms']:>8.1f}ms"
            print(f"{load + ' %':>5} {row['rate_rps']:>7.3f} {mode:<11}{cells}")
        ratios = row["continuous_over_static"]
        print(f"{'':>5} {'':>7} {'cont/stat':<11}" + "".join(f"{ratios.get(k, float('nan')):>9.3f}x" for k in RATIOS))
    for goal in figures["goals"]:
        verdict = "met" if goal["met"] else "NOT MET"
        print(f"goal at {goal['load']} % load: {goal['figure']} continuous/static {goal['ratio']} "
              f"(goal {goal['goal']}): {verdict}")  # fmt: skip


def failures(figures: dict[str, Any]) -> list[str]:
    return [
        f"load {load} %, {mode}: {row[mode]['failed']} failed ({row[mode]['errors']})"
        for load, row in figures["loads"].items()
        for mode in MODES
        if row[mode]["failed"]
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per load and mode (default 200)")
    parser.add_argument("--loads", type=lambda t: [int(x) for x in t.split(",")], default=[50, 80, 100],
                        help="loads, %% of the static capacity (default 50,80,100)")  # fmt: skip
    parser.add_argument("--capacity-requests", type=int, default=48, help="requests of the closed loop (default 48)")
    parser.add_argument("--concurrency", type=int, default=8, help="callers of the closed loop (default 8)")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--steps-min", type=int, default=20)
    parser.add_argument("--steps-max", type=int, default=40)
    parser.add_argument("--no-refiner", type=float, default=0.1, help="share of requests without a refiner")
    parser.add_argument("--two-images", type=float, default=0.1, help="share of requests with two images")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--json", type=Path, default=RESULTS / "continuous_cpu.json", help="where the figures go")
    quick = {"requests": 6, "capacity_requests": 4, "concurrency": 4, "steps_min": 4, "steps_max": 8}
    args = parse_args(parser, quick, argv)
    mix = Mix(steps_min=args.steps_min, steps_max=args.steps_max, no_refiner=args.no_refiner,
              two_images=args.two_images)  # fmt: skip

    workdir = Path(tempfile.mkdtemp(prefix="refinery-bench-continuous-"))
    services: dict[str, Service] = {}
    try:
        folders = tiny_pair(workdir / "models")
        pair = f"local:{folders['A']}+local:{folders['R']}"
        for mode in MODES:
            flags = ["--pin", pair, "--max-batch", str(args.max_batch), "--max-queue", "256", "--batching", mode]
            services[mode] = Service(folders, "cpu", workdir / f"cache-{mode}", flags)
            warm_up(services[mode], mix)
        figures: dict[str, Any] = {"capacity": capacity(services, mix, args)}
        figures["loads"] = loads(services, mix, figures["capacity"]["static"]["requests_per_s"], args)
    finally:
        for service in services.values():
            service.close()
        shutil.rmtree(workdir, ignore_errors=True)
    figures["goals"] = goals(figures)
    figures["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report(figures)
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    if failures(figures):
        sys.exit("bench_continuous: requests failed:\n  " + "\n  ".join(failures(figures)))


if __name__ == "__main__":
    main()
