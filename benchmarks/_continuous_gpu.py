"""The GPU benchmark's continuous-batching sections (issue 19): benchmarks/bench_continuous.py's comparison at
full size, on the device, with the tuned static service beside it as the reference an operator would weigh.

"continuous": two `refinery serve` processes, both alive through the section and both `--compile off`
(continuous batching runs eager UNets: a compiled device falls back to static batches), `--max-batch 4`,
`--max-queue 256` (nothing refused for a full queue: what is measured is waiting, not admission), differing only
in `--batching static` / `continuous`. The static server's capacity is measured by a closed loop of
`--concurrent` callers; then Poisson arrivals at 80 % and 100 % of it, the same requests and schedule for both
servers, alternating which goes first from load to load. Requests: `--size`, steps uniform in 2/3..4/3 of
`--steps` (20..40 by default), the refiner from 70..95 % (10 % without one), one image each (10 % two);
`--continuous-requests` per load and server (40: p99 is then about the slowest request).

"continuous tuned": the tuned service (compiled, the script's tuned flags) with `--batching static`, the eager
pair stopped, its shapes compiled first, at 80 % of the eager static capacity with the same requests and
schedule: one line, the figure continuous batching has to beat on a GPU that compiles.

Per server and load: p50/p99 time to first step and end to end, throughput, failures (benchmarks/_arrivals.py),
the server's per-stage medians; continuous / static (and continuous / tuned static) ratios, and the issue's
goals. Figures under "continuous" in the run's JSON, rewritten after every load; a table in the log.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Protocol

from benchmarks._arrivals import Mix, closed_loop, open_loop, summary, unit_poisson
from benchmarks._report import Report
from benchmarks._service import Service, log, median_timings
from benchmarks.bench_continuous import MODES, RATIOS, caller, goals, warm_up
from refinery.v1 import generation_pb2 as pb

LOADS = (80, 100)
TUNED_LOAD = 80  # the load of the latency goals; 100 % of the eager capacity does not saturate a compiled server
SEED = 19  # bench_continuous.py's, so the two benchmarks draw the same mix


class Bench(Protocol):
    """What the section needs of gpu_sdxl.py's run: its report and settings, and its way of starting services."""

    report: Report
    args: argparse.Namespace
    services: list[Service]

    def service(self, flags: list[str]) -> Service: ...

    def stop(self, service: Service) -> None: ...

    def tuned_flags(self) -> list[str]: ...

    def compiles(self) -> bool: ...


@dataclass(frozen=True)
class Workload:
    """The requests of every load, their unit-rate arrival pattern, and the closed loop's own requests."""

    mix: Mix
    requests: list[pb.GenerateRequest]
    unit: list[float]
    capacity_requests: list[pb.GenerateRequest]

    @classmethod
    def of(cls, args: argparse.Namespace) -> Workload:
        steps = args.steps
        mix = Mix(size=args.size, steps_min=max(2, round(steps * 2 / 3)), steps_max=max(3, round(steps * 4 / 3)))
        count = args.continuous_requests
        # At least two rounds of the callers, so the closed loop measures a server that is never idle.
        capacity = max(2 * args.concurrent, count // 3)
        return cls(mix, mix.requests(count, SEED), unit_poisson(count, SEED), mix.requests(capacity, SEED + 1))

    def settings(self, args: argparse.Namespace) -> dict[str, Any]:
        return {
            "requests_per_load": len(self.requests), "capacity_requests": len(self.capacity_requests),
            "capacity_callers": args.concurrent, "size": self.mix.size,
            "steps": [self.mix.steps_min, self.mix.steps_max],
            "refiner_start_percent": [self.mix.start_min, self.mix.start_max], "no_refiner": self.mix.no_refiner,
            "two_images": self.mix.two_images, "max_batch": 4, "loads_percent": list(LOADS), "seed": SEED,
        }  # fmt: skip


def eager_flags(mode: str) -> list[str]:
    return ["--compile", "off", "--batching", mode, "--max-queue", "256"]


def phase(run: Bench) -> None:
    """Both sections, each time-boxed by the report; the tuned reference needs the eager static capacity."""
    report, args = run.report, run.args
    work = Workload.of(args)
    figures: dict[str, Any] = {"settings": work.settings(args)}
    with report.section("continuous", needs_s=args.needs_s * 8) as go:
        if go:
            _alone(run)
            services = {mode: run.service(eager_flags(mode)) for mode in MODES}
            for service in services.values():
                warm_up(service, work.mix)
            _static_against_continuous(report, services, work, figures, args.concurrent)
            for service in services.values():
                run.stop(service)
            _raise_on_failures(figures, MODES)
    with report.section("continuous tuned", needs_s=args.needs_s * 4) as go:
        if go:
            _alone(run)
            _tuned_reference(run, work, figures)
            _raise_on_failures(figures, ("tuned_static",))


def _alone(run: Bench) -> None:
    """The section's servers alone on the device: what earlier sections left running is stopped."""
    for service in list(run.services):
        run.stop(service)


def _static_against_continuous(
    report: Report, services: dict[str, Service], work: Workload, figures: dict[str, Any], callers: int
) -> None:
    static = services["static"]
    log(f"continuous: static capacity, {len(work.capacity_requests)} requests, {callers} callers")
    rate, failed = closed_loop(caller(static), work.capacity_requests, callers)
    if failed:
        raise RuntimeError(f"{failed} capacity requests failed; the server's log ends:\n{static.log_tail()}")
    figures["static_capacity_rps"] = round(rate, 4)
    figures["loads"] = {}
    report.put(continuous=figures)
    for i, load in enumerate(LOADS):
        per_s = rate * load / 100
        row: dict[str, Any] = {"rate_rps": round(per_s, 4)}
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            log(f"continuous: load {load} %, {mode}, {len(work.requests)} requests at {per_s:.3f}/s")
            row[mode] = _open_loop(services[mode], work, per_s)
        row["continuous_over_static"] = _ratios(row["continuous"], row["static"])
        figures["loads"][str(load)] = row
        figures["goals"] = goals(figures)
        report.put(continuous=figures)
    for line in table(figures):
        log(line)


def _tuned_reference(run: Bench, work: Workload, figures: dict[str, Any]) -> None:
    report, args = run.report, run.args
    rate = figures.get("static_capacity_rps")
    if not rate:
        raise RuntimeError("no static capacity to load against: the section continuous did not measure it")
    service = run.service([*run.tuned_flags(), "--batching", "static", "--max-queue", "256"])
    if run.compiles():
        deadline = time.monotonic() + report.left_s() - args.needs_s * 3
        figures["tuned_compiled"] = service.wait_compiled(deadline)
    warm_up(service, work.mix)
    per_s = rate * TUNED_LOAD / 100
    log(f"continuous tuned: load {TUNED_LOAD} %, tuned static, {len(work.requests)} requests at {per_s:.3f}/s")
    row = figures.setdefault("loads", {}).setdefault(str(TUNED_LOAD), {"rate_rps": round(per_s, 4)})
    row["tuned_static"] = _open_loop(service, work, per_s)
    if "continuous" in row:
        row["continuous_over_tuned_static"] = _ratios(row["continuous"], row["tuned_static"])
    report.put(continuous=figures)
    run.stop(service)
    for line in table(figures):
        log(line)


def _open_loop(service: Service, work: Workload, per_s: float) -> dict[str, Any]:
    """The workload's requests sent to `service` on the unit pattern scaled to `per_s`: what callers saw."""
    service.timings()  # only this load's requests in the stage medians
    figures = summary(open_loop(caller(service), work.requests, [t / per_s for t in work.unit]))
    figures["server_stages_s"] = median_timings(service.timings())
    if figures["failed"]:
        figures["server_log_tail"] = service.log_tail(1500)  # INTERNAL hides the cause from clients
    return figures


def _ratios(numerator: dict[str, Any], denominator: dict[str, Any]) -> dict[str, float]:
    return {key: round(numerator[key] / denominator[key], 3) for key in RATIOS if denominator[key]}


def _raise_on_failures(figures: dict[str, Any], servers: tuple[str, ...]) -> None:
    """A request of `servers` that failed fails the section (after its figures are written), as
    bench_continuous.py exits 1."""
    failed = [
        f"load {load} %, {name}: {row[name]['failed']} failed ({row[name]['errors']})"
        for load, row in figures.get("loads", {}).items()
        for name in servers
        if row.get(name, {}).get("failed")
    ]
    if failed:
        raise RuntimeError("requests failed: " + "; ".join(failed))


def table(figures: dict[str, Any]) -> list[str]:
    """The figures as the log shows them: a row per server and load, ratios beneath, then the goals."""
    keys = ("first_step_p50_s", "first_step_p99_s", "end_to_end_p50_s", "end_to_end_p99_s")
    head = ("first p50", "first p99", "e2e p50", "e2e p99", "req/s", "failed")
    lines = [f"static capacity (closed loop): {figures.get('static_capacity_rps')} requests/s"]
    lines.append(f"{'load':>5} {'rate/s':>7} {'server':<26}" + "".join(f"{h:>10}" for h in head))
    for load, row in figures.get("loads", {}).items():
        for name in ("static", "continuous", "tuned_static"):
            if name in row:
                s = row[name]
                cells = "".join(f"{s[k]:>9.3f}s" for k in keys) + f"{s['throughput_rps']:>10.3f}{s['failed']:>10}"
                lines.append(f"{load + ' %':>5} {row['rate_rps']:>7.3f} {name.replace('_', ' '):<26}{cells}")
        for name in ("continuous_over_static", "continuous_over_tuned_static"):
            if name in row:
                label = name.replace("_over_", " / ").replace("_", " ")
                ratios = "".join(f"{row[name].get(k, float('nan')):>9.3f}x" for k in RATIOS)
                lines.append(f"{'':>5} {'':>7} {label:<26}{ratios}")
    for goal in figures.get("goals", []):
        verdict = "met" if goal["met"] else "NOT MET"
        lines.append(f"goal at {goal['load']} % load: {goal['figure']} continuous/static {goal['ratio']} "
                     f"(goal {goal['goal']}): {verdict}")  # fmt: skip
    return lines
