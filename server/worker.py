"""One device worker: a thread that owns a device and runs jobs from a FIFO, one at a time.

Generation never runs on the event loop. The servicer submits a job with an `EventSink`; this thread resolves
and loads the models (keeping them resident), runs the exact two-stage runner, and reports every step through
the sink, which hands events to the RPC's loop without waiting for the client. Cancelling a ticket stops its
job at the next denoising step and frees the device for the next one. A failing job ends its own stream with
its error and never the worker.

This is the `server.dispatch.Dispatcher` for one device; the scheduler issue generalises it (admission limits,
priorities, batching, several devices).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelstore import ModelStore, require_role
from modelstore.errors import ModelStoreError
from modelstore.loading import load_pipeline
from modelstore.record import ModelRecord
from server import preview, runner
from server.device import DeviceSpec
from server.dispatch import EventSink, Ticket
from server.encode import encode_image
from server.errors import JobCancelled, ServerError, ShuttingDown
from server.job import (
    GenerationJob,
    ImageResult,
    LoadPhase,
    ModelLoading,
    ModelRole,
    Preview,
    Progress,
    Queued,
    RenderShape,
    Sample,
)
from server.runner import PipelinePair, RunResult, StepObserver, StepState

log = logging.getLogger(__name__)


class PipelineRunner(Protocol):
    """`server.runner.run`'s signature; tests substitute a runner that fails on purpose."""

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult: ...


class PipelineLoader(Protocol):
    def __call__(self, record: ModelRecord, *, role: str, device: str, dtype: Any) -> Any: ...


class ResidentPipelines:
    """Pipelines resident on the worker's device, loaded on first use and kept (nothing is evicted yet; the
    scheduler issue brings a budget). Keyed by (canonical AIR, role): a model used both as base and as refiner
    is loaded twice, once per pipeline class. Only the worker thread uses it, so it needs no lock."""

    def __init__(self, store: ModelStore, device: DeviceSpec, loader: PipelineLoader = load_pipeline) -> None:
        self._store = store
        self._device = device
        self._loader = loader
        self._loaded: dict[tuple[str, ModelRole], Any] = {}

    def acquire(self, model: str, role: ModelRole, notify: Callable[[ModelLoading], None]) -> Any:
        """The pipeline of canonical AIR `model` in `role`, loading it first if needed.

        `notify` hears LOADING then READY, and only when a load happens. Model-store errors (unknown model,
        wrong architecture for the role, unsafe file) name the request field the model came from.
        """
        pipeline = self._loaded.get((model, role))
        if pipeline is not None:
            return pipeline
        try:
            record = self._store.resolve(model)
            require_role(record, role.value)
            notify(ModelLoading(record.canonical, role, LoadPhase.LOADING))
            started = time.perf_counter()
            device, dtype = self._device.name, self._device.dtype
            pipeline = self._loader(record, role=role.value, device=device, dtype=dtype)
        except ModelStoreError as exc:
            exc.for_field(role.field)
            raise
        log.info(
            "loaded %s as %s on %s in %.2fs",
            record.canonical,
            role.value,
            self._device.label,
            time.perf_counter() - started,
        )
        self._loaded[(model, role)] = pipeline
        notify(ModelLoading(record.canonical, role, LoadPhase.READY))
        return pipeline


@dataclass
class _Call:
    """Work for the worker thread that is not a request (preloading models)."""

    fn: Callable[[], None]
    future: Future[None] = field(default_factory=Future)


@dataclass
class _Timings:
    queued_s: float = 0.0
    loading_s: float = 0.0
    running_s: float = 0.0  # the runner, start to end (the stages below, when it finished)
    base_s: float = 0.0
    refiner_s: float = 0.0
    decode_s: float = 0.0
    encode_s: float = 0.0


class DeviceWorker:
    """A `Dispatcher` backed by one thread and one device. Call `start()` once, `close()` at the end."""

    def __init__(
        self,
        store: ModelStore,
        device: DeviceSpec,
        *,
        loader: PipelineLoader = load_pipeline,
        run: PipelineRunner = runner.run,
        name: str = "device-worker-0",
    ) -> None:
        self.device = device
        self._pipelines = ResidentPipelines(store, device, loader)
        self._run = run
        self._cond = threading.Condition()
        self._waiting: deque[Ticket | _Call] = deque()
        self._running: Ticket | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    # ---- Dispatcher ----------------------------------------------------------------------------------

    def submit(self, job: GenerationJob, sink: EventSink) -> Ticket:
        ticket = Ticket(job, sink)
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            self._waiting.append(ticket)
            self._announce_positions()
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        ticket.request_cancel()
        with self._cond:
            dequeued = ticket in self._waiting
            if dequeued:
                self._waiting.remove(ticket)
                self._announce_positions()
        if dequeued:
            # Never started: it ends here. A running job ends on the worker thread at its next step.
            ticket.sink.close(ticket.cancel_error)
            _log_outcome(ticket, ticket.cancel_error, _Timings(time.perf_counter() - ticket.submitted_at), 0)

    # ---- life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def preload(self, models: Sequence[tuple[str, ModelRole]]) -> Future[None]:
        """Load `models` (canonical AIR, role) on the worker thread; the future completes when all are
        resident, or fails with the first error."""

        def load_all() -> None:
            for model, role in models:
                self._pipelines.acquire(model, role, notify=lambda _event: None)

        call = _Call(load_all)
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._waiting.append(call)
            self._cond.notify()
        return call.future

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new work, end queued jobs with UNAVAILABLE, stop the running job at its next step, and wait
        up to `timeout_s` for the thread. Call it after the gRPC server has drained."""
        with self._cond:
            self._closed = True
            drained = list(self._waiting)
            self._waiting.clear()
            running = self._running
            self._cond.notify_all()
        stopping = ShuttingDown("the server is shutting down; retry on another replica")
        for item in drained:
            if isinstance(item, Ticket):
                item.request_cancel(stopping)
                item.sink.close(item.cancel_error)
            else:
                item.future.set_exception(stopping)
        if running is not None:
            running.request_cancel(stopping)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- the worker thread ---------------------------------------------------------------------------

    def _announce_positions(self) -> None:
        """Tell every waiting job whose place changed where it now stands. Call with the lock held (so
        announcements stay in order); emitting only schedules a callback on the RPC's loop."""
        tickets = [item for item in self._waiting if isinstance(item, Ticket)]
        for position, ticket in enumerate(tickets):
            if ticket.queued_position != position:
                ticket.queued_position = position
                ticket.sink.emit(Queued(position=position, queue_depth=len(tickets)))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                item = self._waiting.popleft()
                self._running = item if isinstance(item, Ticket) else None
                self._announce_positions()
            try:
                if isinstance(item, Ticket):
                    self._execute(item)
                else:
                    self._call(item)
            except Exception:  # a bug in the worker's own bookkeeping; the jobs behind must still run
                log.exception("device worker: unexpected error between jobs")
            finally:
                with self._cond:
                    self._running = None

    def _call(self, call: _Call) -> None:
        try:
            call.fn()
        except Exception as exc:  # the caller (start-up) decides what a failed preload means
            call.future.set_exception(exc)
        else:
            call.future.set_result(None)

    def _execute(self, ticket: Ticket) -> None:
        job = ticket.job
        started = time.perf_counter()
        timings = _Timings(queued_s=started - ticket.submitted_at)
        observer = _JobObserver(ticket)
        error: Exception | None = None
        try:
            if ticket.cancel_requested:
                raise ticket.cancel_error
            pair = self._acquire(job, ticket.sink)
            timings.loading_s = time.perf_counter() - started
            if ticket.cancel_requested:  # gone while its models loaded (a deadline, a disconnect)
                raise ticket.cancel_error
            native_width, native_height = runner.native_size(pair.base)
            shape = job.shape(job.width or native_width, job.height or native_height)
            samples = job.samples()
            observer.start()
            try:
                result = self._run(pair, shape, samples, observer)
            finally:
                timings.running_s = time.perf_counter() - observer.started
            timings.base_s = result.timings.base_s
            timings.refiner_s = result.timings.refiner_s
            timings.decode_s = result.timings.decode_s
            encode_started = time.perf_counter()
            self._emit_images(job, samples, result, ticket.sink)
            timings.encode_s = time.perf_counter() - encode_started
        except Exception as exc:  # every failure ends this job's stream, never the worker
            error = exc
            if not _is_expected(exc):
                log.error("request %s failed unexpectedly", job.request_id, exc_info=exc)
        ticket.sink.close(error)
        _log_outcome(ticket, error, timings, observer.steps_done)

    def _acquire(self, job: GenerationJob, sink: EventSink) -> PipelinePair:
        base = self._pipelines.acquire(job.model, ModelRole.BASE, sink.emit)
        refiner = None
        if job.refiner is not None:
            refiner = self._pipelines.acquire(job.refiner.model, ModelRole.REFINER, sink.emit)
        return PipelinePair(base, refiner)

    @staticmethod
    def _emit_images(job: GenerationJob, samples: Sequence[Sample], result: RunResult, sink: EventSink) -> None:
        for index, (sample, image) in enumerate(zip(samples, result.images, strict=True)):
            sink.emit(
                ImageResult(
                    data=encode_image(image, job.output_format),
                    mime_type=job.output_format.mime_type,
                    seed=sample.seed,
                    index=index,
                    width=image.width,
                    height=image.height,
                    base_steps=job.base_steps,
                    refiner_steps=job.refiner_steps,
                    model=job.model,
                    refiner_model=job.refiner.model if job.refiner is not None else "",
                )
            )


class _JobObserver:
    """Per-step: stop if cancelled, report progress, and send previews every `preview_every` steps."""

    def __init__(self, ticket: Ticket) -> None:
        self._ticket = ticket
        self._indices = tuple(range(ticket.job.number_results))
        self.started = time.perf_counter()
        self.steps_done = 0

    def start(self) -> None:
        self.started = time.perf_counter()

    def on_step(self, state: StepState) -> None:
        if self._ticket.cancel_requested:
            raise self._ticket.cancel_error  # unwinds out of diffusers; the device is free at once
        self.steps_done = state.overall_step
        sink = self._ticket.sink
        sink.emit(
            Progress(
                stage=state.stage,
                step=state.step,
                stage_steps=state.stage_steps,
                overall_step=state.overall_step,
                total_steps=state.total_steps,
                elapsed_s=time.perf_counter() - self.started,
                image_indices=self._indices,
            )
        )
        every = self._ticket.job.preview_every
        if every and state.overall_step % every == 0:
            for index, image in enumerate(preview.latents_to_images(state.normalized_latents())):
                sink.emit(
                    Preview(
                        stage=state.stage,
                        step=state.step,
                        overall_step=state.overall_step,
                        image_index=index,
                        data=preview.encode_preview(image),
                        mime_type=preview.PREVIEW_MIME,
                        width=image.width,
                        height=image.height,
                    )
                )


def _is_expected(exc: BaseException) -> bool:
    return isinstance(exc, (ServerError, ModelStoreError))


def _log_outcome(ticket: Ticket, error: BaseException | None, timings: _Timings, steps_done: int) -> None:
    """The one line per request: outcome and where the time went."""
    job = ticket.job
    if error is None:
        outcome = "ok"
    elif isinstance(error, JobCancelled):
        outcome = "cancelled"
    else:
        outcome = f"failed ({type(error).__name__})"
    log.info(
        "request %s %s: queued %.3fs, loading %.3fs, running %.3fs (base %.3fs, refiner %.3fs, "
        "decode %.3fs), encode %.3fs; step %d/%d (%d+%d), %d result(s), model %s, refiner %s",
        job.request_id,
        outcome,
        timings.queued_s,
        timings.loading_s,
        timings.running_s,
        timings.base_s,
        timings.refiner_s,
        timings.decode_s,
        timings.encode_s,
        steps_done,
        job.steps,
        job.base_steps,
        job.refiner_steps,
        job.number_results,
        job.model,
        job.refiner.model if job.refiner is not None else "-",
        extra={
            "request_id": job.request_id,
            "outcome": outcome,
            "timings": {k: round(v, 4) for k, v in vars(timings).items()},
            "steps_done": steps_done,
        },
    )
