"""The checks a request passes once its models are known, still before it costs a device anything: that its
pair can fit on some device beside the pinned pairs, that its work at the size it runs at is within the limit,
and that its deadline can be met with the work ahead of it (`pace.py`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from modelstore import native_size
from modelstore.units import format_bytes
from server.core.domain import Job
from server.core.errors import OutOfDeviceMemory, too_much_work
from server.scheduling.pace import Pace, Shape, shape_of
from server.scheduling.pairs import PairSpec
from server.scheduling.ticket import Ticket
from server.scheduling.worker import DeviceWorker


def _until(deadline: float | None, now: float) -> float | None:
    return None if deadline is None else deadline - now


class Admission:
    def __init__(self, workers: Sequence[DeviceWorker], pace: Pace, work_limit: float) -> None:
        self._workers = workers
        self._pace = pace
        self._work_limit = work_limit

    def admit(self, ticket: Ticket, spec: PairSpec, others: Iterable[Ticket]) -> Shape:
        """Check `ticket` now that its models are resolved to `spec`, with the other requests not yet ended
        (`others`): the shape it runs in. Raises the error that ends it otherwise."""
        self._check_fits_somewhere(spec)
        width, height = self._size(ticket.job, spec)
        self._check_work(ticket.job, ticket.job.work(width, height))
        shape = shape_of(ticket.job, width, height)
        self._check_deadline(ticket, shape, others)
        return shape

    def too_small(self, spec: PairSpec) -> list[DeviceWorker]:
        """The devices `spec` can never fit on beside their pinned pairs."""
        return [w for w in self._workers if not w.residency.could_ever_fit(spec)]

    def _check_fits_somewhere(self, spec: PairSpec) -> None:
        if len(too_small := self.too_small(spec)) == len(self._workers):
            budgets = ", ".join(f"{w.device.name}: {format_bytes(w.residency.budget_bytes)}" for w in too_small)
            raise OutOfDeviceMemory(f"{spec.key} cannot fit on any device beside the pinned pairs ({budgets})")

    @staticmethod
    def _size(job: Job, spec: PairSpec) -> tuple[int, int]:
        """The size the request will run at (reading the base's configs when the request leaves the size to
        the model: once per request, at resolution)."""
        if job.width and job.height:
            return job.width, job.height
        native = native_size(spec.base.record) or (0, 0)
        return job.width or native[0], job.height or native[1]

    def _check_work(self, job: Job, work: float) -> None:
        """At the model's native size, the request's work is known only once the model is: checked here,
        still before any device work (a size given in the request was checked on arrival)."""
        if job.width and job.height:
            return
        if work > self._work_limit:
            raise too_much_work(work, self._work_limit)

    def _check_deadline(self, ticket: Ticket, shape: Shape, others: Iterable[Ticket]) -> None:
        """Refuse, before it reaches a device, a request whose deadline the measured pace cannot meet: with
        the rest of the running requests and the queued ones it would wait for (each until its own deadline
        at most; a request behind a running one once waited out its whole deadline and expired)."""
        if ticket.deadline is None:
            return
        now = time.monotonic()
        ahead = [
            (self._seconds_left(t), _until(t.deadline, now))
            for t in others
            if t is not ticket and t.shape is not None and (t.timings.started or t.job.priority >= ticket.job.priority)
        ]
        self._pace.check(shape, ahead, len(self._workers), ticket.deadline - now)

    def _seconds_left(self, ticket: Ticket) -> float:
        """The device time `ticket` still needs as the pace estimates it (0 when unknown: never a reason to
        refuse another request)."""
        assert ticket.shape is not None
        seconds = self._pace.seconds_for(ticket.shape) or 0.0
        return seconds * (1 - ticket.steps_done / max(ticket.job.total_steps, 1))
