"""Steady arrivals through the fleet's front with the Python client: a few threads each sending one short
`Generate` after another until stopped, every call's outcome and every resend recorded. The lost-replica tests
(tests/fleet/test_lost_replica.py) and `benchmarks/bench_fleet.py --lost` stop and kill replicas under it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from refinery.client import Client, Image, Progress, RefineryError, Resend, Resent

# nginx moves on from a lost replica at once; the budget only bounds a broken fleet.
POLICY = Resend(attempts=8, budget_s=30.0, initial_backoff_s=0.2, max_backoff_s=5.0)


@dataclass(frozen=True)
class Call:
    request_id: str
    code: grpc.StatusCode
    details: str
    events: int  # events the caller saw: a failed call with none was lost, one with some was cut
    steps_done: int  # denoising steps its stream showed (work a resend of a cut call would repeat)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK


@dataclass
class Steady:
    """`clients` threads sending through `target`; `policy` None sends each call once."""

    target: str
    model: str
    policy: Resend | None = POLICY
    clients: int = 3
    steps: int = 2
    calls: list[Call] = field(default_factory=list)
    resent: list[Resent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._client = Client(self.target, resend=self.policy, on_resend=self.resent.append)
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(self.clients)]

    def start(self) -> Steady:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        self._client.close()

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the fleet did not get there in time")
            time.sleep(0.05)

    def lost(self) -> list[Call]:
        """Calls that failed before the caller saw anything: what a resend is for."""
        return [c for c in self.calls if not c.ok and c.events == 0]

    def cut(self) -> list[Call]:
        """Calls that failed after showing progress: never resent."""
        return [c for c in self.calls if not c.ok and c.events > 0]

    def resends_by_call(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for resend in self.resent:
            counts[resend.request_id] = counts.get(resend.request_id, 0) + 1
        return counts

    def _loop(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            request_id = f"steady-{worker}-{n}"
            events = steps = 0
            started = time.monotonic()
            code, details = grpc.StatusCode.OK, ""
            try:
                for event in self._client.generate(
                    "a lighthouse", model=self.model, steps=self.steps, width=64, height=64, seed=n,
                    request_id=request_id, timeout=120,
                ):  # fmt: skip
                    events += 1
                    steps += isinstance(event, Progress)
                    assert not isinstance(event, Image) or event.data
            except RefineryError as error:
                code, details = error.code, error.message
            self.calls.append(Call(request_id, code, details, events, steps, time.monotonic() - started))
