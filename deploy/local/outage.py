"""Losing replicas of a running fleet while calls arrive: SIGTERM-and-restart cycles, and a hang then kill -9.

Used by tests/fleet/test_lost_replica.py and `benchmarks/bench_fleet.py --lost`, with `steady.Steady` sending.

A SIGTERM cycle stops one replica, rotating over the fleet, at a moment when nginx is sending it calls (its
served-call counter moved), so every stop lands under arrivals; the replica is then started again on its port,
and the next cycle waits until nginx sends it calls again. One replica is down at a time: with two down,
nginx (`max_fails=1`) can mark the last one failed after a single refused call and answer 502 at once to every
call for `fail_timeout`. A cycle costs the start of a `refinery serve` (importing torch: ~10-15 s on 2 busy
cores), which is what bounds how many runs a CI job can afford.
"""

from __future__ import annotations

import os
import signal
import time

from deploy.local.fleet import Fleet
from deploy.local.replica import Replica

CALLS = "refinery_requests_total"


def _calls_served(replica: Replica) -> float:
    try:
        return replica.total(CALLS)
    except OSError:  # not listening yet
        return -1.0


def wait_for_traffic(replica: Replica, calls: int = 2, timeout_s: float = 90.0) -> None:
    """Until `replica` (started, or started again) has been sent `calls` more calls."""
    replica.wait_ready(timeout_s)
    deadline = time.monotonic() + timeout_s
    start = _calls_served(replica)
    while _calls_served(replica) < start + calls:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{replica.spec.name} got no calls for {timeout_s:.0f}s")
        time.sleep(0.05)


def sigterm_cycles(fleet: Fleet, runs: int, timeout_s: float = 90.0) -> None:
    """`runs` SIGTERMs under arrivals, rotating over the replicas; each stopped replica is started again."""
    for run in range(runs):
        victim = fleet.replicas[run % len(fleet.replicas)]
        wait_for_traffic(victim, timeout_s=timeout_s)
        victim.terminate()
        # Its metrics port stays bound until it exits; the drain is short (short calls, a short grace).
        victim.wait(timeout_s)
        victim.start()
        wait_for_traffic(victim, timeout_s=timeout_s)


def hang_then_kill(victim: Replica, hang_s: float = 1.5) -> None:
    """Freeze `victim` (SIGSTOP) while calls keep arriving, as a node that stops answering, then kill -9 it:
    the calls it was running fail mid-stream, and those written to it while frozen fail with no response."""
    wait_for_traffic(victim)
    os.kill(victim.pid, signal.SIGSTOP)
    time.sleep(hang_s)
    victim.kill()
