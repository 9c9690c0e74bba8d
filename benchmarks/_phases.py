"""The GPU benchmark's measurements, each a function of a service (or the hand-run pipelines) and the run's
settings, recording into the report: per-image latency by batch size, sequential against concurrent clients,
and the tuned service against the tuned hand-run, interleaved so that both see the same machine."""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks._direct import Direct
from benchmarks._profile import thread_profile
from benchmarks._report import Report
from benchmarks._service import Service, log, median_timings


def latency(report: Report, prefix: str, service: Service, args: argparse.Namespace) -> None:
    """Per-image seconds end to end (PNG included) of one request of 1 image and of 4, and the server's own
    per-stage timings of the 1-image requests."""
    service.generate(args.size, args.steps)  # warm-up (and, for the tuned service, compiled already)
    service.timings()
    one = [service.generate(args.size, args.steps) for _ in range(args.reps)]
    stages = median_timings(service.timings())
    service.generate(args.size, args.steps, n=4)
    four = [service.generate(args.size, args.steps, n=4) / 4 for _ in range(max(1, args.reps - 1))]
    report.put(**{
        f"{prefix}_batch1_per_image_s": statistics.median(one),
        f"{prefix}_batch1_runs_s": [round(t, 4) for t in one],
        f"{prefix}_batch1_server_stages_s": stages,
        f"{prefix}_batch4_per_image_s": statistics.median(four),
        f"{prefix}_batch4_runs_per_image_s": [round(t, 4) for t in four],
    })  # fmt: skip
    log(f"{prefix}: batch 1 {one}, batch 4 per image {four}; server stages {stages}")


def concurrency(report: Report, prefix: str, service: Service, args: argparse.Namespace) -> None:
    """8 one-image requests one after another against the same 8 at once (each its own batch), alternating
    rounds: per-image time, the device's busy share of the wall time, and the server's per-stage medians."""
    n = args.concurrent
    runs: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    busy: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    stages: dict[str, list[dict[str, float]]] = {"sequential": [], "concurrent": []}
    service.timings()
    for _ in range(args.rounds):
        for mode, run in (("sequential", service.sequential), ("concurrent", service.burst)):
            before = service.busy_s()
            wall = run(args.size, args.steps, n)
            runs[mode].append(wall / n)
            busy[mode].append((service.busy_s() - before) / wall)
            stages[mode] += service.timings()
    figures: dict[str, Any] = {}
    for mode in runs:
        figures[f"{prefix}_{mode}_{n}_per_image_s"] = statistics.median(runs[mode])
        figures[f"{prefix}_{mode}_{n}_device_busy_share"] = round(statistics.median(busy[mode]), 3)
        figures[f"{prefix}_{mode}_{n}_server_stages_s"] = median_timings(stages[mode])
    figures[f"{prefix}_concurrent_over_sequential"] = round(
        figures[f"{prefix}_concurrent_{n}_per_image_s"] / figures[f"{prefix}_sequential_{n}_per_image_s"], 3
    )
    report.put(**figures)
    log(f"{prefix}: sequential {runs['sequential']}, concurrent {runs['concurrent']} per image; busy {busy}")


def threads_under_load(report: Report, prefix: str, service: Service, args: argparse.Namespace) -> None:
    """py-spy on the server while it serves a burst of concurrent requests."""
    with ThreadPoolExecutor(1) as pool:
        burst = pool.submit(service.burst, args.size, args.steps, args.concurrent)
        time.sleep(1.0)  # into the burst
        report.put(**{f"{prefix}_threads_under_load": thread_profile(service.process.pid, args.py_spy_s)})
        burst.result()


def service_vs_direct(report: Report, service: Service, direct: Direct, args: argparse.Namespace) -> None:
    """The tuned service against the tuned hand-run, alternating, at batch 1 and 4 (per image, PNG included)."""
    for n in (1, 4):
        direct.generate(args.size, args.steps, args.base_steps, n)  # warm-up at this batch size
        service_s, direct_s = [], []
        for _ in range(args.reps if n == 1 else max(1, args.reps - 1)):
            direct_s.append(direct.generate(args.size, args.steps, args.base_steps, n)[0] / n)
            service_s.append(service.generate(args.size, args.steps, n=n) / n)
        report.put(**{
            f"direct_tuned_batch{n}_per_image_s": statistics.median(direct_s),
            f"service_tuned_batch{n}_interleaved_per_image_s": statistics.median(service_s),
            f"service_over_direct_tuned_batch{n}": round(statistics.median(service_s) / statistics.median(direct_s), 3),
        })  # fmt: skip
        log(f"batch {n}: direct {direct_s}, service {service_s} per image")


def start(report: Report, prefix: str, make: Any, args: argparse.Namespace) -> Service:
    """Start a service (`make()`), record process start to SERVING, then the first request right after."""
    service: Service = make()
    first = service.generate(args.size, args.steps)
    report.put(**{f"{prefix}_serving_s": round(service.ready_s, 2), f"{prefix}_first_request_s": round(first, 3)})
    log(f"{prefix}: SERVING after {service.ready_s:.1f}s; first request {first:.2f}s")
    return service
