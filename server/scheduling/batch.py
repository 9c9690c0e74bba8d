"""Running one batch on its device worker's thread: load the pair, denoise, report each step; then hand each
request's images to the host's `deliver`, which encodes and sends them off the device's thread while the worker
goes on.

Every request of a batch shares the pair and the shape; each gets its own `Progress` (with its own result
indexes), its own previews and its own images. A request cancelled mid-run is ended at the next step and gets
nothing more; the others go on, and the run itself stops once no request is left to serve.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from modelstore.errors import ModelStoreError
from server.core.domain import (
    JobEvent,
    LoadPhase,
    ModelLoading,
    PairKey,
    Preview,
    Progress,
    RenderShape,
    Sample,
)
from server.core.errors import DeadlineExceeded, JobCancelled, OutOfDeviceMemory, ServerError
from server.core.metrics import Metrics
from server.generation import (
    PREVIEW_MIME,
    Encoder,
    PipelinePair,
    PipelineRunner,
    RunResult,
    StepState,
    encode_preview,
    latents_to_images,
    native_size,
)
from server.scheduling.delivery import Delivery, results_delivery
from server.scheduling.devices import DeviceSpec
from server.scheduling.pace import Shape, shape_of
from server.scheduling.pairs import ModelSpec
from server.scheduling.residency import LoadReport, Residency
from server.scheduling.ticket import Ticket

log = logging.getLogger(__name__)


class BatchHost(Protocol):
    """What a batch asks of the scheduler: the pairs not to evict, and how to end or deliver a request."""

    def waiting_pairs(self) -> set[PairKey]: ...

    def finish(self, ticket: Ticket, error: BaseException | None) -> None: ...

    def deliver(self, send: Callable[[], None]) -> None: ...

    def observe_pace(self, shape: Shape, seconds: float, step_seconds: float | None) -> None:
        """A batch of `shape` took `seconds` on a device, `step_seconds` a step (None: one step)."""
        ...


class BatchDevice(Protocol):
    """What a batch uses of the device worker that runs it."""

    @property
    def host(self) -> BatchHost: ...

    @property
    def device(self) -> DeviceSpec: ...

    @property
    def residency(self) -> Residency: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def run_pipeline(self) -> PipelineRunner: ...

    @property
    def encode(self) -> Encoder: ...

    def observe_load(self, report: LoadReport) -> None: ...


class Batch:
    """Requests with the same pair and shape, denoised together on one device. `run()` once; every request
    ends through the host's `finish` (directly, or after its images are delivered)."""

    def __init__(self, worker: BatchDevice, tickets: list[Ticket]) -> None:
        self._worker = worker
        self._host = worker.host
        self._tickets = tickets
        self._active = list(tickets)  # not yet ended, nor handed over for delivery
        offset = 0
        for ticket in tickets:
            ticket.batch = tuple(tickets)
            ticket.batch_offset = offset
            offset += ticket.job.number_results
        self._started = self._last_step = time.perf_counter()
        self._first_step = 0.0  # when the first step was reported: steps alone are timed from there
        self._steps_seen = 0
        self._replay_until = 0

    def run(self) -> None:
        metrics = self._worker.metrics
        now = time.perf_counter()
        for ticket in self._tickets:
            ticket.timings.started = now
            metrics.queue_wait.observe(now - ticket.timings.submitted)
        spec = self._tickets[0].spec
        assert spec is not None, "only resolved requests reach a device"
        acquired = False
        try:
            self._drop_cancelled()
            pair = dataclasses.replace(self._acquire(), loras=self._tickets[0].loras)  # equal across the batch
            acquired = True
            for ticket in self._tickets:
                ticket.timings.loading_s = time.perf_counter() - now
            job = self._tickets[0].job
            native_width, native_height = native_size(pair.base)
            shape = job.shape(job.width or native_width, job.height or native_height)
            samples = [s for t in self._tickets for s in t.job.samples()]
            metrics.batch_images.observe(len(samples))
            self._started = self._last_step = time.perf_counter()
            for ticket in self._tickets:
                ticket.timings.run_started = self._started
            result = self._run_with_oom_retry(pair, shape, samples)
            ran = time.perf_counter()
            for ticket in self._tickets:
                ticket.timings.run_ended = ran
            self._observe_pace(shape_of(job, shape.width, shape.height, images=len(samples)))
            self._drop_expired()  # after the decode: an image nobody waits for is not encoded
            for ticket in self._active:
                ticket.timings.run = result.timings
                for task in self._delivery(ticket, shape, samples, result).tasks():
                    self._host.deliver(task)
            self._active = []  # handed over: the delivery alone ends these requests now
        except Exception as exc:
            if not isinstance(exc, (ServerError, ModelStoreError)):
                log.error("batch on %s failed unexpectedly", self._worker.device.name, exc_info=exc)
            for ticket in self._active:
                self._host.finish(ticket, exc)
            self._active = []
        finally:
            if acquired:
                self._worker.residency.release(spec.key)

    # ---- on the worker's thread -------------------------------------------------------------------------

    def _acquire(self) -> PipelinePair:
        spec = self._tickets[0].spec
        assert spec is not None

        def on_load(model: ModelSpec, done: bool) -> None:
            self._emit_all(ModelLoading(model.record.air, model.role, LoadPhase.READY if done else LoadPhase.LOADING))

        protected = self._host.waiting_pairs() - {spec.key}
        pair, report = self._worker.residency.acquire(spec, protected, on_load=on_load)
        self._worker.observe_load(report)
        return pair

    def _run_with_oom_retry(self, pair: PipelinePair, shape: RenderShape, samples: list[Sample]) -> RunResult:
        """Out of device memory: evict every idle pair, try once more, then give up with RESOURCE_EXHAUSTED."""
        worker = self._worker
        try:
            return worker.run_pipeline(pair, shape, samples, self)
        except torch.OutOfMemoryError:
            evicted = worker.residency.evict_idle()
            log.warning("out of memory on %s; evicted %d idle pair(s), retrying once", worker.device.name, len(evicted))
        # The retry repeats steps already reported; they are not reported twice.
        self._replay_until = max(t.steps_done for t in self._tickets)
        try:
            return worker.run_pipeline(pair, shape, samples, self)
        except torch.OutOfMemoryError:
            raise OutOfDeviceMemory(
                f"{len(samples)} image(s) of {shape.width}x{shape.height} do not fit on {worker.device.name}; "
                "try fewer results or a smaller size"
            ) from None

    def _observe_pace(self, shape: Shape) -> None:
        """Tell the host what this run took, and its steps apart from the rest (prompts, the decode)."""
        steps = self._steps_seen
        step_s = (self._last_step - self._first_step) / (steps - 1) if steps > 1 else None
        self._host.observe_pace(shape, time.perf_counter() - self._started, step_s)

    def _emit_all(self, event: JobEvent) -> None:
        for ticket in self._active:
            ticket.sink.emit(event)

    def _drop_cancelled(self) -> None:
        for ticket in [t for t in self._active if t.cancel_requested]:
            self._active.remove(ticket)
            self._host.finish(ticket, ticket.cancel_error)
        self._drop_expired()

    def _drop_expired(self) -> None:
        """End the requests whose deadline passed (checked at every step, so also just before the decode,
        and after it); the run stops once no request is left."""
        now = time.monotonic()
        for ticket in [t for t in self._active if t.deadline is not None and t.deadline <= now]:
            self._active.remove(ticket)
            self._host.finish(ticket, DeadlineExceeded("the deadline passed while the request was running"))
        if not self._active:
            raise JobCancelled("no request of the batch is waiting for its images any more")

    def on_step(self, state: StepState) -> None:
        """The runner's `StepObserver`: close cancelled requests, report progress and previews to the others."""
        now = time.perf_counter()
        step_s = now - self._last_step
        self._worker.metrics.step_time.labels(state.stage.value).observe(step_s)
        for ticket in self._active:
            stepped = ticket.timings.stepped
            stepped[state.stage.value] = stepped.get(state.stage.value, 0.0) + step_s
        self._last_step = now
        self._first_step = self._first_step or now
        self._steps_seen += 1
        self._drop_cancelled()  # raising here unwinds out of diffusers: the device is free at once
        if state.overall_step <= self._replay_until:
            return
        latents = None
        for ticket in self._active:
            if ticket.steps_done == 0:
                self._worker.metrics.first_step.observe(now - ticket.timings.submitted)
            ticket.steps_done = state.overall_step
            ticket.sink.emit(
                Progress(
                    stage=state.stage,
                    step=state.step,
                    stage_steps=state.stage_steps,
                    overall_step=state.overall_step,
                    total_steps=state.total_steps,
                    elapsed_s=now - self._started,
                    image_indices=tuple(range(ticket.job.number_results)),
                    branch=state.branch,
                )
            )
            every = ticket.job.preview_every
            if every and state.overall_step % every == 0:
                latents = state.normalized_latents() if latents is None else latents
                self._preview(ticket, state, latents)

    def _preview(self, ticket: Ticket, state: StepState, latents: torch.Tensor) -> None:
        for event in preview_events(ticket, state, latents):
            ticket.sink.emit(event)

    def _delivery(self, ticket: Ticket, shape: RenderShape, samples: list[Sample], result: RunResult) -> Delivery:
        """Encode and send one request's images on the encoder threads (or the worker's, with encode_threads 0)."""
        return results_delivery(ticket, shape, samples, result, encode=self._worker.encode, finish=self._host.finish)


def preview_events(ticket: Ticket, state: StepState, latents: torch.Tensor) -> list[Preview]:
    """`ticket`'s previews of a step: its own images of the step's latents (it starts at its batch offset)."""
    start = ticket.batch_offset
    images = latents_to_images(latents[start : start + ticket.job.number_results])
    return [
        Preview(
            stage=state.stage,
            step=state.step,
            overall_step=state.overall_step,
            image_index=index,
            data=encode_preview(image),
            mime_type=PREVIEW_MIME,
            width=image.width,
            height=image.height,
            branch=state.branch,
        )
        for index, image in enumerate(images)
    ]
