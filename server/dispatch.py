"""The seam between the gRPC servicer and whatever runs jobs.

The servicer only ever calls `Dispatcher.submit` and `Dispatcher.cancel`, and reads a job's life back through
the `EventSink` it handed in. Today one `server.worker.DeviceWorker` (one thread, one device, FIFO) is the
dispatcher; the scheduler issue replaces it with admission control, priorities, batching and several devices
behind the same two calls.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from server.errors import JobCancelled, ServerError
from server.job import GenerationJob, JobEvent


class EventSink(Protocol):
    """Where a job's events go. Called from the worker thread; must not block.

    A dispatcher calls `emit` for each event, in order, then `close` exactly once: with None after the last
    image, or with the exception that ended the job (a `server.errors.ServerError`, a
    `modelstore.errors.ModelStoreError`, or anything unexpected, which the servicer reports as INTERNAL).
    """

    def emit(self, event: JobEvent) -> None: ...

    def close(self, error: BaseException | None) -> None: ...


class Ticket:
    """One submitted job, as its dispatcher tracks it. Cancel it through `Dispatcher.cancel`."""

    def __init__(self, job: GenerationJob, sink: EventSink) -> None:
        self.job = job
        self.sink = sink
        self.submitted_at = time.perf_counter()
        # Last position announced to the client (a Queued event); None until the first one.
        self.queued_position: int | None = None
        self._cancel_requested = threading.Event()
        self._cancel_error: ServerError = JobCancelled("the request was cancelled")

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    @property
    def cancel_signal(self) -> threading.Event:
        """Set once the job should stop: for waits that can give up (a model download) rather than poll."""
        return self._cancel_requested

    @property
    def cancel_error(self) -> ServerError:
        """What a cancelled job ends with: CANCELLED for a client, UNAVAILABLE for a draining server."""
        return self._cancel_error

    def request_cancel(self, error: ServerError | None = None) -> None:
        """Ask the job to stop at its next step. Thread-safe; the first reason given wins."""
        if not self._cancel_requested.is_set() and error is not None:
            self._cancel_error = error
        self._cancel_requested.set()

    def __repr__(self) -> str:
        return f"Ticket({self.job.request_id})"


class Dispatcher(Protocol):
    def submit(self, job: GenerationJob, sink: EventSink, *, deadline: float | None = None) -> Ticket:
        """Admit `job`; its events go to `sink`. `deadline` (time.monotonic()) is when the client stops
        waiting. Raises `server.errors.ShuttingDown` while draining, `server.errors.Overloaded` when full."""
        ...

    def cancel(self, ticket: Ticket) -> None:
        """Stop `ticket`'s job: dropped if still queued, stopped at its next step if running; no-op once done.
        Its sink is closed with `server.errors.JobCancelled` unless it had already finished."""
        ...
