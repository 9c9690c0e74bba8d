"""An open-loop load for a Generate server: a mixed request list, a Poisson arrival schedule, a client that sends
every request on schedule whatever the server does, and the latencies a caller sees (benchmarks/
bench_continuous.py).

Open loop, because a closed loop (a fixed number of callers, each waiting for its answer before the next) slows
its own arrivals down when the server is slow, and so hides the queueing it should measure. Every request has
a thread of its own, started before the first arrival and sleeping until its time, so a slow stream never
delays another request's send; the actual send time is recorded, and how late it was against the schedule."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from refinery.v1 import generation_pb2 as pb

# The client's threads need a moment to start before the first arrival is due.
_LEAD_S = 0.5


@dataclass(frozen=True)
class Mix:
    """The workload: steps uniform in [steps_min, steps_max]; a share of requests without a refiner, the rest
    with the refiner from a start uniform in [start_min, start_max] %; a share asking for two images."""

    size: int = 64
    steps_min: int = 20
    steps_max: int = 40
    start_min: int = 70
    start_max: int = 95
    no_refiner: float = 0.1
    two_images: float = 0.1

    def requests(self, count: int, seed: int) -> list[pb.GenerateRequest]:
        rng = random.Random(seed)
        made = []
        for i in range(count):
            request = pb.GenerateRequest(
                positive_prompt=f"a lighthouse on a cliff at dusk, variation {i}",
                width=self.size,
                height=self.size,
                steps=rng.randint(self.steps_min, self.steps_max),
                seed=seed * 100_000 + i,
                number_results=2 if rng.random() < self.two_images else 1,
            )
            if rng.random() >= self.no_refiner:
                request.refiner.CopyFrom(pb.Refiner(start_step_percentage=rng.randint(self.start_min, self.start_max)))
            made.append(request)
        return made


def unit_poisson(count: int, seed: int) -> list[float]:
    """Arrival times (s) of a Poisson process at 1 request/s; divide by a rate for that rate. The same draws
    scaled keep one arrival pattern across loads, so loads differ only in rate."""
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(1.0)
        times.append(now)
    return times


@dataclass
class Outcome:
    """One request as its caller saw it, in seconds from the run's start."""

    scheduled_s: float
    sent_s: float = float("nan")
    first_step_s: float | None = None
    done_s: float | None = None
    images: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.done_s is not None


Call = Callable[[pb.GenerateRequest], Any]


def _stream(generate: Call, request: pb.GenerateRequest, outcome: Outcome, origin: float) -> None:
    """Send `request`, reading its events: the first Progress is its first step, the last image its end."""
    outcome.sent_s = time.perf_counter() - origin
    try:
        for response in generate(request):
            kind = response.WhichOneof("event")
            if kind == "progress" and outcome.first_step_s is None:
                outcome.first_step_s = time.perf_counter() - origin
            elif kind == "image":
                outcome.images += 1
                outcome.done_s = time.perf_counter() - origin
        wanted = max(1, request.number_results)
        if outcome.images != wanted:
            outcome.error = f"{outcome.images} images, asked {wanted}"
    except Exception as error:  # a refusal or a failure is counted, never raised: the load goes on
        outcome.error = f"{type(error).__name__}: {error}"[:300]


def open_loop(generate: Call, requests: Sequence[pb.GenerateRequest], arrivals: Sequence[float]) -> list[Outcome]:
    """Each request sent at its arrival time (s from the start), all on their own threads; waits for all."""
    origin = time.perf_counter() + _LEAD_S
    outcomes = [Outcome(scheduled_s=at) for at in arrivals]

    def one(index: int) -> None:
        delay = origin + arrivals[index] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        _stream(generate, requests[index], outcomes[index], origin)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def closed_loop(generate: Call, requests: Sequence[pb.GenerateRequest], concurrency: int) -> tuple[float, int]:
    """`concurrency` callers working through `requests`, each sending its next as soon as its last ended: the
    server never idles for want of work. (requests completed per second, failures)."""
    origin = time.perf_counter()
    outcomes = [Outcome(scheduled_s=0.0) for _ in requests]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: _stream(generate, requests[i], outcomes[i], origin), range(len(requests))))
    done = [o for o in outcomes if o.ok]
    wall = max((o.done_s or 0.0) for o in done) if done else float("inf")
    return len(done) / wall, len(outcomes) - len(done)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the nearest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """p50/p99 time to first step (sent to first Progress) and end to end (sent to last image), in seconds;
    throughput (completed per second from the first send to the last completion); failures; how late the
    client sent against the schedule (its honesty: near 0 means no arrival waited for the client)."""
    done = [o for o in outcomes if o.ok]
    first = [o.first_step_s - o.sent_s for o in done if o.first_step_s is not None]
    end = [(o.done_s or 0.0) - o.sent_s for o in done]
    start = min(o.sent_s for o in outcomes)
    span = max((o.done_s or 0.0) for o in done) - start if done else float("inf")
    late = [o.sent_s - o.scheduled_s for o in outcomes]
    return {
        "requests": len(outcomes),
        "images": sum(o.images for o in done),
        "first_step_p50_s": round(percentile(first, 50), 4),
        "first_step_p99_s": round(percentile(first, 99), 4),
        "end_to_end_p50_s": round(percentile(end, 50), 4),
        "end_to_end_p99_s": round(percentile(end, 99), 4),
        "end_to_end_mean_s": round(statistics.fmean(end), 4) if end else float("nan"),
        "throughput_rps": round(len(done) / span, 4),
        "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "send_late_max_ms": round(max(late) * 1000, 2),
        "send_late_p99_ms": round(percentile(late, 99) * 1000, 2),
    }
