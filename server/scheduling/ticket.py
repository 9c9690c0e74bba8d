"""A `Ticket`: one admitted request, from `Scheduler.submit` until it ends, and its one log line.

The servicer hands in a `Job` (what was asked) and an `EventSink` (where its events go) and gets a ticket back;
everything the scheduler, the resolver and the device worker learn about the request lives on the ticket:
its deadline, its resolved models and the leases that hold them in the cache, its place in a batch, and where
its time went. It ends exactly once (`Scheduler.finish`), which closes its sink, releases its leases and logs
one line with its outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from server.core.domain import Job, JobEvent
from server.core.errors import DeadlineExceeded, JobCancelled, Overloaded, ServerError
from server.generation import StageLoras
from server.scheduling.leases import LeaseSet

if TYPE_CHECKING:
    from server.generation import StageTimings
    from server.scheduling.pace import Shape
    from server.scheduling.pairs import PairSpec

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """Where a request's events go. Called from the scheduler's threads; must not block.

    `emit` is called for each event, in order, then `close` exactly once: with None after the last image, or
    with the exception that ended the request (a `server.core.errors.ServerError`, a
    `modelstore.errors.ModelStoreError`, or anything unexpected, which the API reports as INTERNAL).
    """

    def emit(self, event: JobEvent) -> None: ...

    def close(self, error: BaseException | None) -> None: ...


@runtime_checkable
class ConfirmingSink(EventSink, Protocol):
    """A sink that learns whether its events reached the client: a request whose images were made but not
    received is a failure, never `ok`."""

    def delivered(self) -> Future[BaseException | None]:
        """Settled with None once every event was handed to the client, or with the error that stopped it."""
        ...


class RequestTrace(Protocol):
    """A request's trace (`server/scheduling/spans.py`), begun by the API when the call arrived: its ids for
    the log line, and its spans, recorded from the ticket's `Timings` once the request ends."""

    def log_fields(self) -> dict[str, str]: ...

    def end(self, ticket: Ticket, outcome: str, error: BaseException | None) -> None: ...


@dataclass
class Timings:
    """Where a request's time went, for its log line and its trace's spans (perf_counter seconds; 0.0: not
    reached)."""

    submitted: float = field(default_factory=time.perf_counter)
    resolving: float = 0.0  # when a resolver thread began on its models
    resolved: float = 0.0
    started: float = 0.0  # when a device took it
    loading_s: float = 0.0
    run_started: float = 0.0  # the batch's denoising run, after the load
    run_ended: float = 0.0
    delivering: float = 0.0  # when its first image began encoding
    encode_s: float = 0.0
    run: StageTimings | None = None  # the runner's own account, once the run is over
    # Seconds to each reported step, by stage ("base" / "refiner"): what a request that ended mid-run spent.
    stepped: dict[str, float] = field(default_factory=dict)


class Ticket:
    """One admitted request. Cancel it through `Scheduler.cancel`."""

    def __init__(
        self,
        job: Job,
        sink: EventSink,
        *,
        leases: LeaseSet,
        deadline: float | None,
        trace: RequestTrace | None = None,
    ) -> None:
        self.job = job
        self.sink = sink
        self.trace = trace  # None: tracing is off and the caller sent no trace context
        self.leases = leases  # the models it holds in the cache, from resolution until it ends
        self.deadline = deadline  # time.monotonic(); None: the client waits as long as it takes
        self.timings = Timings()
        self.spec: PairSpec | None = None  # the resolved models, once the resolver is done
        self.shape: Shape | None = None  # what its run costs depends on, as the pace learns it; known with `spec`
        self.loras = StageLoras()  # its LoRAs' cached files, resolved with `spec`
        # Its place in the batch it runs in: images offset..offset+count of the batch are its own.
        self.batch_offset = 0
        self.batch: tuple[Ticket, ...] = ()  # the requests of the batch it ran in, itself included
        self.steps_done = 0
        self._cancel_requested = threading.Event()
        self._cancel_error: ServerError = JobCancelled("the request was cancelled")

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    @property
    def cancel_signal(self) -> threading.Event:
        """Set once the request should stop: for waits that can give up (a model download) rather than poll."""
        return self._cancel_requested

    @property
    def cancel_error(self) -> ServerError:
        """What a cancelled request ends with: CANCELLED for a client, UNAVAILABLE for a draining server."""
        return self._cancel_error

    def request_cancel(self, error: ServerError | None = None) -> None:
        """Ask the request to stop at its next step. Thread-safe; the first reason given wins."""
        if not self._cancel_requested.is_set() and error is not None:
            self._cancel_error = error
        self._cancel_requested.set()

    def __repr__(self) -> str:
        return f"Ticket({self.job.request_id})"


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, JobCancelled):
        return "cancelled"
    if isinstance(error, DeadlineExceeded):
        return "deadline_exceeded"
    if isinstance(error, Overloaded):
        return "rejected"  # refused for load (RESOURCE_EXHAUSTED, retry later): never a failure of the server
    return "failed"


def log_outcome(ticket: Ticket, error: BaseException | None, outcome: str) -> None:
    """The one line per admitted request: its outcome and where its time went."""
    job, t = ticket.job, ticket.timings
    queued = (t.started or time.perf_counter()) - t.submitted
    stage = _stage_seconds(t)
    label = outcome if error is None or outcome != "failed" else f"failed ({type(error).__name__})"
    log.info(
        "request %s %s: queued %.3fs, loading %.3fs, base %.3fs, refiner %.3fs, decode %.3fs, encode %.3fs; "
        "step %d/%d (%d+%d%s), %s, %d result(s), model %s, refiner %s",
        job.request_id,
        label,
        queued,
        t.loading_s,
        stage("base"),
        stage("refiner"),
        stage("decode"),
        t.encode_s,
        ticket.steps_done,
        job.total_steps,
        job.base_steps_run,
        job.refiner_steps,
        f" +{job.refiner_steps} base-only" if job.compare else "",  # compare: the base's own image's steps
        _mode(job),
        job.number_results,
        job.model,
        job.refiner.model if job.refiner is not None else "-",
        extra={
            "request_id": job.request_id,
            "outcome": outcome,
            "timings": {
                "queued_s": round(queued, 4),
                "loading_s": round(t.loading_s, 4),
                "base_s": round(stage("base"), 4),
                "refiner_s": round(stage("refiner"), 4),
                "decode_s": round(stage("decode"), 4),
                "encode_s": round(t.encode_s, 4),
            },
            "steps_done": ticket.steps_done,
            "mode": job.mode.value,
            # The trace's ids (README "Tracing"): the request span's, or the caller's trace id alone when tracing
            # is off but the caller sent a traceparent.
            **(ticket.trace.log_fields() if ticket.trace is not None else {}),
        },
    )


def _mode(job: Job) -> str:
    """The log line's word for what the request started from: "text", or where on the grid an image began."""
    if job.seed_image is None:
        return "text"
    refine_only = " refine-only" if job.refiner is not None and job.base_steps_run == 0 else ""
    return f"{job.mode.value} from step {job.start_index + 1}/{job.steps}{refine_only}"


def _stage_seconds(timings: Timings) -> Callable[[str], float]:
    def seconds(stage: str) -> float:
        if timings.run is not None:
            return float(getattr(timings.run, f"{stage}_s"))
        return timings.stepped.get(stage, 0.0)  # ended mid-run: its steps so far, and no decode

    return seconds
