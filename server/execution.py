"""Running one batch on a device worker's thread: load the pair, denoise, report; then hand each request's
images to `Scheduler.deliver`, which encodes and sends them on an encoder thread while the worker goes on.

Every request of a batch shares the pair and the shape; each gets its own `Progress` (with its own result
indexes), its own previews and its own images. A request cancelled mid-run is closed at the next step and gets
nothing more; the others go on, and the run itself stops once no request is left to serve.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from modelstore.errors import ModelStoreError
from server import preview, runner
from server.encode import encode_image
from server.errors import DeadlineExceeded, JobCancelled, OutOfDeviceMemory, ServerError
from server.job import ImageResult, LoadPhase, ModelLoading, ModelRole, Preview, Progress, RenderShape, Sample
from server.residency import ModelSpec, PairKey
from server.runner import PipelinePair, RunResult, StepObserver, StepState

if TYPE_CHECKING:
    from server.scheduler import DeviceWorker, Work

log = logging.getLogger(__name__)


class PipelineRunner(Protocol):
    """`server.runner.run`'s signature; tests substitute runners that fail or wait on purpose."""

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult: ...


@dataclass
class _Member:
    """One request's place in a batch: which samples are its own."""

    work: Work
    offset: int
    count: int
    steps_done: int = 0
    active: bool = True


def run_batch(worker: DeviceWorker, works: list[Work]) -> None:
    """Run `works` (same pair, same shape) as one batch; every request ends through `scheduler.finish`."""
    scheduler = worker.scheduler
    metrics = scheduler.metrics
    now = time.perf_counter()
    members: list[_Member] = []
    offset = 0
    for work in works:
        work.started = now
        metrics.queue_wait.observe(now - work.handle.submitted_at)
        members.append(_Member(work, offset, work.job.number_results))
        offset += work.job.number_results
    spec = works[0].spec
    assert spec is not None
    observer = _BatchObserver(worker, members)
    acquired = False
    try:
        observer.drop_cancelled()
        pipelines = _acquire(worker, members)
        acquired = True
        for m in members:
            m.work.loading_s = time.perf_counter() - now
        pair = PipelinePair(pipelines["base"], pipelines.get("refiner"))
        job = works[0].job
        native_width, native_height = runner.native_size(pair.base)
        shape = job.shape(job.width or native_width, job.height or native_height)
        samples = [s for m in members for s in m.work.job.samples()]
        metrics.batch_images.observe(len(samples))
        observer.start()
        result = _run_with_oom_retry(worker, pair, shape, samples, observer)
        for m in members:
            if m.active:
                scheduler.deliver(functools.partial(_deliver, worker, m, shape, samples, result))
                m.active = False  # handed over: the encoder thread alone ends this request now
    except Exception as exc:
        if not isinstance(exc, (ServerError, ModelStoreError)):
            log.error("batch on %s failed unexpectedly", worker.device.name, exc_info=exc)
        for m in members:
            if m.active:
                m.active = False
                scheduler.finish(m.work, exc, steps_done=m.steps_done)
    finally:
        if acquired:
            worker.residency.release(spec.key)


def _acquire(worker: DeviceWorker, members: list[_Member]) -> dict[str, Any]:
    spec = members[0].work.spec
    assert spec is not None
    scheduler = worker.scheduler

    def on_load(model: ModelSpec, done: bool) -> None:
        role = ModelRole.BASE if model.role == "base" else ModelRole.REFINER
        phase = LoadPhase.READY if done else LoadPhase.LOADING
        _emit_all(members, ModelLoading(model.record.canonical, role, phase))

    protected = {k for k in scheduler.waiting_pairs() if isinstance(k, PairKey) and k != spec.key}
    pipelines, report = worker.residency.acquire(spec, protected, on_load=on_load)
    worker.observe_load(report)
    return pipelines


def _run_with_oom_retry(
    worker: DeviceWorker, pair: PipelinePair, shape: RenderShape, samples: list[Sample], observer: _BatchObserver
) -> RunResult:
    """Out of device memory: evict every idle pair, try once more, then give up with RESOURCE_EXHAUSTED."""
    try:
        return worker.scheduler.run_pipeline(pair, shape, samples, observer)
    except torch.OutOfMemoryError:
        evicted = worker.residency.evict_idle()
        log.warning("out of memory on %s; evicted %d idle pair(s), retrying once", worker.device.name, len(evicted))
    observer.restart()
    try:
        return worker.scheduler.run_pipeline(pair, shape, samples, observer)
    except torch.OutOfMemoryError:
        raise OutOfDeviceMemory(
            f"{len(samples)} image(s) of {shape.width}x{shape.height} do not fit on {worker.device.name}; "
            "try fewer results or a smaller size"
        ) from None


def _emit_all(members: list[_Member], event: Any) -> None:
    for m in members:
        if m.active:
            m.work.handle.sink.emit(event)


class _BatchObserver:
    """Per step: close cancelled requests, report progress and previews to each remaining one."""

    def __init__(self, worker: DeviceWorker, members: list[_Member]) -> None:
        self._worker = worker
        self._members = members
        self._started = time.perf_counter()
        self._last_step = self._started
        self._replay_until = 0

    def start(self) -> None:
        self._started = self._last_step = time.perf_counter()

    def restart(self) -> None:
        """A retried run repeats steps already reported; they are not reported twice."""
        self._replay_until = max(m.steps_done for m in self._members)

    def drop_cancelled(self) -> None:
        for m in self._members:
            if m.active and m.work.handle.cancel_requested:
                m.active = False
                self._worker.scheduler.finish(m.work, m.work.handle.cancel_error, steps_done=m.steps_done)
        if not any(m.active for m in self._members):
            raise JobCancelled("every request of the batch was cancelled")

    def on_step(self, state: StepState) -> None:
        now = time.perf_counter()
        self._worker.scheduler.metrics.step_time.labels(state.stage.value).observe(now - self._last_step)
        self._last_step = now
        self.drop_cancelled()  # raising here unwinds out of diffusers: the device is free at once
        if state.overall_step <= self._replay_until:
            return
        latents = None
        for m in self._members:
            if not m.active:
                continue
            m.steps_done = state.overall_step
            job = m.work.job
            sink = m.work.handle.sink
            sink.emit(
                Progress(
                    stage=state.stage,
                    step=state.step,
                    stage_steps=state.stage_steps,
                    overall_step=state.overall_step,
                    total_steps=state.total_steps,
                    elapsed_s=now - self._started,
                    image_indices=tuple(range(m.count)),
                )
            )
            if job.preview_every and state.overall_step % job.preview_every == 0:
                if latents is None:
                    latents = state.normalized_latents()
                images = preview.latents_to_images(latents[m.offset : m.offset + m.count])
                for index, image in enumerate(images):
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


def _deliver(
    worker: DeviceWorker, member: _Member, shape: RenderShape, samples: list[Sample], result: RunResult
) -> None:
    """Encode and send one request's images, then end it (on an encoder thread, or on the worker's)."""
    work = member.work
    work.run_timings = result.timings
    try:
        _send_images(work, member, shape, samples, result)
    except Exception as exc:
        log.error("sending the images of request %s failed", work.job.request_id, exc_info=exc)
        worker.scheduler.finish(work, exc, steps_done=member.steps_done)
        return
    worker.scheduler.finish(work, None, steps_done=member.steps_done)


def _send_images(work: Work, member: _Member, shape: RenderShape, samples: list[Sample], result: RunResult) -> None:
    job = work.job
    encode_started = time.perf_counter()
    for index in range(member.count):
        image = result.images[member.offset + index]
        sample = samples[member.offset + index]
        work.handle.sink.emit(
            ImageResult(
                data=encode_image(image, job.output_format),
                mime_type=job.output_format.mime_type,
                seed=sample.seed,
                index=index,
                width=image.width,
                height=image.height,
                base_steps=shape.base_steps,
                refiner_steps=shape.refiner_steps,
                model=job.model,
                refiner_model=job.refiner.model if job.refiner is not None else "",
            )
        )
    work.encode_s = time.perf_counter() - encode_started


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, JobCancelled):
        return "cancelled"
    if isinstance(error, DeadlineExceeded):
        return "deadline_exceeded"
    return "failed"


def log_outcome(work: Work, error: BaseException | None, outcome: str, steps_done: int) -> None:
    """The one line per request: outcome and where the time went."""
    job = work.job
    now = time.perf_counter()
    queued = (work.started or now) - work.handle.submitted_at
    loading, encode = work.loading_s, work.encode_s
    timings = work.run_timings
    base = timings.base_s if timings else 0.0
    refiner = timings.refiner_s if timings else 0.0
    decode = timings.decode_s if timings else 0.0
    label = outcome if error is None or outcome != "failed" else f"failed ({type(error).__name__})"
    log.info(
        "request %s %s: queued %.3fs, loading %.3fs, base %.3fs, refiner %.3fs, decode %.3fs, encode %.3fs; "
        "step %d/%d (%d+%d), %d result(s), model %s, refiner %s",
        job.request_id,
        label,
        queued,
        loading,
        base,
        refiner,
        decode,
        encode,
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
            "timings": {
                "queued_s": round(queued, 4),
                "loading_s": round(loading, 4),
                "base_s": round(base, 4),
                "refiner_s": round(refiner, 4),
                "decode_s": round(decode, 4),
                "encode_s": round(encode, 4),
            },
            "steps_done": steps_done,
        },
    )
