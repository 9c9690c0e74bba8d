"""A replica dies (kill -9) or is stopped (SIGTERM) while the fleet serves: what clients of the front see.

Killed: only the calls in flight on that replica fail; every new call succeeds, and the dead replica's pairs
move to the next replicas of the ring. Stopped: its running calls finish and nothing fails.

Through nginx a call cut mid-stream ends with INTERNAL, not UNAVAILABLE: once response headers have passed,
nginx can only reset the client's HTTP/2 stream (RST_STREAM INTERNAL_ERROR), which gRPC maps to INTERNAL.
Clients connected straight to a replica see UNAVAILABLE.

A SIGTERM while new calls keep arriving has a gap that stock nginx cannot close: a call that reaches the
replica in the instant its server begins to stop is refused after nginx has written it (nginx 502, which
the client sees as UNAVAILABLE, or CANCELLED from the replica), and nginx never resends a gRPC request body.
4 runs in 12 here lost one such call; neither a client retry policy (gRPC counts the 502 as a response) nor an
nginx reload (a busy HTTP/2 client connection keeps the old configuration) avoided it (deploy/README.md). So
the SIGTERM test sends the signal while calls run on every replica and no new call is on its way, and sends
new calls once the replica's port is closed. No client here has a retry policy: what succeeds, nginx made
succeed. tests/fleet/test_lost_replica.py sends under arrivals with the Python client, which resends what
nginx cannot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest

from deploy.local.fleet import Fleet
from deploy.local.replica import Replica
from deploy.local.traffic import CHANNEL_OPTIONS, TIMEOUT_S, Outcome, Pair, generate, generation_stub, mix
from refinery.v1.generation_pb2_grpc import GenerationServiceStub
from tests.fleet.conftest import PAIRS, needs_nginx

pytestmark = [needs_nginx, pytest.mark.slow]

# Long enough to be caught mid-stream (150 steps of the tiny models: seconds on a CPU).
LONG_STEPS = 150
# The size of the long calls on the replica that a kill -9 cuts: ~9x the work of the others, so that the one
# running there is still running however slowly the other long calls start.
CUT_SIZE = 192


class Traffic:
    """Calls through the front: one long call per pair, a steady stream of short ones, a burst at the end."""

    def __init__(self, stub: GenerationServiceStub) -> None:
        self.stub = stub
        self.pool = ThreadPoolExecutor(8)
        self.long: dict[Pair, Future[Outcome]] = {}
        self.short: list[Future[Outcome]] = []
        self.after: list[Outcome] = []
        self._stop = threading.Event()
        self._streams: list[Future[None]] = []

    def start_long_calls(self, size: Callable[[Pair], int]) -> None:
        """One long call per pair, returning once every one of them is running on its replica."""
        running = {pair: threading.Event() for pair in PAIRS}
        for pair in PAIRS:
            self.long[pair] = self.pool.submit(
                generate, self.stub, pair, steps=LONG_STEPS, size=size(pair), running=running[pair]
            )
        for pair, event in running.items():
            assert event.wait(TIMEOUT_S), f"{pair} never started running"

    def start_stream(self, seed: int) -> None:
        """Short calls, one after another, over every pair, until `close`."""

        def loop() -> None:
            for i, pair in enumerate(mix(PAIRS, 10_000, seed)):
                if self._stop.is_set():
                    return
                self.short.append(self.pool.submit(generate, self.stub, pair, seed=i))
                self.short[-1].result()

        self._streams.append(self.pool.submit(loop))

    def burst(self, count: int, seed: int) -> None:
        """`count` new calls over every pair, all at once, waited for."""
        futures = [self.pool.submit(generate, self.stub, p, seed=i) for i, p in enumerate(mix(PAIRS, count, seed))]
        self.after = [f.result(TIMEOUT_S) for f in futures]

    def finish(self) -> None:
        """Stop the stream and wait for every call."""
        self._stop.set()
        for stream in self._streams:
            stream.result(TIMEOUT_S)
        for future in self.long.values():
            future.result(TIMEOUT_S)

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=True)

    def outcomes(self) -> list[Outcome]:
        return [f.result() for f in self.long.values()] + [f.result() for f in self.short] + self.after


def _run(
    fleet: Fleet, act: Callable[[Replica], float], *, stream: bool, victim_size: int = 64
) -> tuple[Traffic, Replica, float]:
    """Warm every pair up, start the long calls (and the stream), act on the replica holding PAIRS[0], burst."""
    victim = fleet.owner(PAIRS[0].key)

    def size(pair: Pair) -> int:
        return victim_size if fleet.owner(pair.key) is victim else 64

    with grpc.insecure_channel(fleet.front, options=CHANNEL_OPTIONS) as channel:
        stub = generation_stub(channel)
        assert all(generate(stub, pair).ok for pair in PAIRS)  # warm-up: every pair resident on its replica
        traffic = Traffic(stub)
        try:
            if stream:
                traffic.start_stream(seed=1)
                traffic.start_stream(seed=2)
            traffic.start_long_calls(size)
            at = act(victim)
            traffic.burst(12, seed=3)
            traffic.finish()
        finally:
            traffic.close()
    return traffic, victim, at


def _last_replica_by_pair(fleet: Fleet) -> dict[str, str]:
    return {call.pair: call.upstreams[-1] for call in fleet.nginx.calls() if call.status == "200"}


def test_kill_9_fails_only_the_calls_in_flight_there_and_its_pairs_move(fleet: Fleet) -> None:
    def kill(victim: Replica) -> float:
        victim.kill()  # returns once the process is gone
        return time.monotonic()

    traffic, victim, killed_at = _run(fleet, kill, stream=True, victim_size=CUT_SIZE)
    victim_pairs = {p for p in PAIRS if fleet.owner(p.key) is victim}

    # The victim runs one request at a time: when it holds two pairs, its first long call may have finished
    # before the second one started running (and the kill came right after that). A call in flight fails, as
    # nginx reports a stream cut mid-response; at least one was in flight, or this test would prove nothing.
    on_victim = [traffic.long[pair].result() for pair in victim_pairs]
    cut = [o for o in on_victim if not o.ok]
    assert cut and all(o.code is grpc.StatusCode.INTERNAL and "RST_STREAM" in o.details for o in cut), on_victim
    # Long calls on the other replicas finish.
    assert all(traffic.long[p].result().ok for p in PAIRS if p not in victim_pairs)
    # Every short call that failed was sent before the kill, for a pair the victim held.
    short = [f.result() for f in traffic.short]
    failed = [o for o in short if not o.ok]
    assert all(o.started < killed_at and o.pair in victim_pairs for o in failed), failed
    # No call started after the kill failed, the burst right after it included.
    after = [o for o in short if o.started > killed_at] + traffic.after
    assert [o.code for o in after] == [grpc.StatusCode.OK] * len(after)
    # The victim's pairs now live on the replicas the ring names once the victim is down.
    served = _last_replica_by_pair(fleet)
    for pair in victim_pairs:
        assert served[pair.key] == fleet.owner(pair.key, down=[victim]).address


def test_sigterm_lets_running_calls_finish_and_new_calls_go_elsewhere(fleet: Fleet) -> None:
    def terminate(victim: Replica) -> float:
        victim.terminate()
        victim.wait_port_closed()  # new calls from now on: the replica refuses connections, nginx moves on
        return time.monotonic()

    traffic, victim, _ = _run(fleet, terminate, stream=False)

    assert victim.wait(TIMEOUT_S) == 0
    # The victim's long call was running when the signal came: it finished, with its image.
    outcomes = traffic.outcomes()
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * len(outcomes), [o for o in outcomes if not o.ok]
    assert all(o.images == 1 for o in outcomes)
