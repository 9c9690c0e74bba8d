"""What the API asks of the scheduler, and nothing more: the servicers depend on this protocol, not on the
`Scheduler` class (vLLM's API layer depends on its `EngineClient` the same way), so a stand-in can serve the
API in a test and the scheduler's internals can change behind it."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

from server.core.domain import Job, PairKey
from server.scheduling.snapshot import SchedulerSnapshot
from server.scheduling.ticket import EventSink, RequestTrace, Ticket


class Engine(Protocol):
    @property
    def work_limit(self) -> float:
        """Megapixel-steps one request may ask for on these devices (`server.core.settings.WORK_LIMITS`)."""
        ...

    def submit(
        self, job: Job, sink: EventSink, *, deadline: float | None = None, trace: RequestTrace | None = None
    ) -> Ticket:
        """Admit `job`, whose events go to `sink`; `deadline` is time.monotonic() when its client stops waiting;
        `trace` is ended with the request. Raises ShuttingDown while draining and Overloaded when the queue is
        full."""
        ...

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request: dropped while queued, stopped at its next step while running; a no-op once ended."""
        ...

    def snapshot(self) -> SchedulerSnapshot:
        """What the devices and the queue hold right now."""
        ...

    def pin(self, pairs: Sequence[PairKey]) -> Future[None]:
        """Load each pair on every device and keep it there; fails leaving none of them newly pinned."""
        ...

    def unpin(self, key: PairKey) -> bool:
        """Let `key` be evicted again; whether any device held it pinned."""
        ...
