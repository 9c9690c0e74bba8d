"""The device worker's queue: positions, cancelling, failures that end a job but never the worker.

The pipelines are stand-ins (loading and denoising are what the integration tests exercise); the worker, its
thread, its queue and the model store are real.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from modelstore import ModelRecord, ModelStore
from modelstore.errors import ModelNotFound, WrongArchitecture
from server.device import DeviceSpec
from server.errors import JobCancelled, ShuttingDown
from server.job import (
    GenerationJob,
    ImageFormat,
    ImageResult,
    JobEvent,
    LoadPhase,
    ModelLoading,
    ModelRole,
    Progress,
    Queued,
    RefinerSpec,
    RenderShape,
    Sample,
    SchedulerKind,
    Stage,
    StartPercentage,
)
from server.runner import PipelinePair, RunResult, StageTimings, StepObserver, StepState
from server.worker import DeviceWorker

TINY_BASE = "builtin:tiny-sdxl-base@1"
TINY_REFINER = "builtin:tiny-sdxl-refiner@1"
WAIT_S = 60  # a hang fails the test; never an expectation about speed


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[JobEvent] = []
        self.error: BaseException | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def emit(self, event: JobEvent) -> None:
        assert not self.closed.is_set(), "event after close"
        with self._lock:
            self.events.append(event)

    def close(self, error: BaseException | None) -> None:
        assert not self.closed.is_set(), "closed twice"
        self.error = error
        self.closed.set()

    def wait(self) -> None:
        assert self.closed.wait(WAIT_S), "the job never ended"

    def of(self, kind: type[Any]) -> list[Any]:
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]


def fake_loader(record: ModelRecord, *, role: str, device: str, dtype: Any) -> Any:
    # native_size() reads these: 8 latent pixels x 8 = 64.
    return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)), vae_scale_factor=8)


class GatedRunner:
    """Reports each step like the real runner; a job whose prompt starts with "hold" waits at its first step
    until released; the prompt "fail" raises a bug."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult:
        if samples[0].prompt == "fail":
            raise RuntimeError("a bug")
        for overall in range(1, shape.steps + 1):
            stage = Stage.BASE if overall <= shape.base_steps else Stage.REFINER
            step = overall if stage is Stage.BASE else overall - shape.base_steps
            stage_steps = shape.base_steps if stage is Stage.BASE else shape.refiner_steps
            latents = torch.zeros(len(samples), 4, shape.height // 8, shape.width // 8)
            observer.on_step(StepState(stage, step, stage_steps, overall, shape.steps, latents, 1.0))
            if overall == 1 and samples[0].prompt.startswith("hold"):
                self.holding.set()
                assert self.release.wait(WAIT_S)
        images = [Image.new("RGB", (shape.width, shape.height), "gray") for _ in samples]
        return RunResult(images, StageTimings())


def make_job(prompt: str = "a cat", **fields: Any) -> GenerationJob:
    values: dict[str, Any] = {
        "request_id": prompt,
        "model": TINY_BASE,
        "refiner": None,
        "prompt": prompt,
        "negative_prompt": None,
        "width": 0,
        "height": 0,
        "steps": 4,
        "base_steps": 4,
        "cfg_scale": 7.0,
        "seed": 10,
        "scheduler": SchedulerKind.EULER,
        "number_results": 1,
        "output_format": ImageFormat.PNG,
        "preview_every": 0,
    }
    values.update(fields)
    return GenerationJob(**values)


@pytest.fixture
def runner_() -> GatedRunner:
    return GatedRunner()


@pytest.fixture
def worker(model_store: ModelStore, runner_: GatedRunner) -> Iterator[DeviceWorker]:
    w = DeviceWorker(model_store, DeviceSpec("cpu", torch.float32), loader=fake_loader, run=runner_)
    w.start()
    yield w
    runner_.release.set()
    w.close(WAIT_S)


def positions(sink: RecordingSink) -> list[tuple[int, int]]:
    return [(q.position, q.queue_depth) for q in sink.of(Queued)]


def test_queue_positions_are_announced_when_they_change(worker: DeviceWorker, runner_: GatedRunner) -> None:
    running = RecordingSink()
    worker.submit(make_job("hold"), running)
    assert runner_.holding.wait(WAIT_S)
    b, c, d = RecordingSink(), RecordingSink(), RecordingSink()
    worker.submit(make_job("b"), b)
    ticket_c = worker.submit(make_job("c"), c)
    worker.submit(make_job("d"), d)
    assert (positions(b), positions(c), positions(d)) == ([(0, 1)], [(1, 2)], [(2, 3)])

    worker.cancel(ticket_c)  # cancelled while queued: ends at once, and d moves up
    c.wait()
    assert isinstance(c.error, JobCancelled)
    assert c.of(Progress) == []
    assert positions(d) == [(2, 3), (1, 2)]

    runner_.release.set()
    for sink in (running, b, d):
        sink.wait()
        assert sink.error is None
    assert positions(d) == [(2, 3), (1, 2), (0, 1)]
    assert positions(running) == [(0, 1)]


def test_a_job_reports_loading_progress_and_images(worker: DeviceWorker) -> None:
    sink = RecordingSink()
    refiner = RefinerSpec(TINY_REFINER, StartPercentage(75))
    worker.submit(make_job(refiner=refiner, base_steps=3, number_results=2, preview_every=2), sink)
    sink.wait()
    assert sink.error is None
    assert sink.of(ModelLoading) == [
        ModelLoading(TINY_BASE, ModelRole.BASE, LoadPhase.LOADING),
        ModelLoading(TINY_BASE, ModelRole.BASE, LoadPhase.READY),
        ModelLoading(TINY_REFINER, ModelRole.REFINER, LoadPhase.LOADING),
        ModelLoading(TINY_REFINER, ModelRole.REFINER, LoadPhase.READY),
    ]
    progress = sink.of(Progress)
    assert [(p.stage, p.step, p.overall_step) for p in progress] == [
        (Stage.BASE, 1, 1),
        (Stage.BASE, 2, 2),
        (Stage.BASE, 3, 3),
        (Stage.REFINER, 1, 4),
    ]
    assert all(p.image_indices == (0, 1) for p in progress)
    images = sink.of(ImageResult)
    assert [(i.index, i.seed, i.width, i.height) for i in images] == [(0, 10, 64, 64), (1, 11, 64, 64)]
    assert all((i.base_steps, i.refiner_steps, i.refiner_model) == (3, 1, TINY_REFINER) for i in images)

    again = RecordingSink()
    worker.submit(make_job(refiner=refiner, base_steps=3), again)
    again.wait()
    assert again.of(ModelLoading) == []  # resident now


def test_model_errors_name_the_field(worker: DeviceWorker) -> None:
    unknown = RecordingSink()
    worker.submit(make_job(refiner=RefinerSpec("builtin:nope@1"), base_steps=3), unknown)
    unknown.wait()
    assert isinstance(unknown.error, ModelNotFound) and unknown.error.field == "refiner.model"

    wrong = RecordingSink()
    worker.submit(make_job(model=TINY_REFINER), wrong)
    wrong.wait()
    assert isinstance(wrong.error, WrongArchitecture) and wrong.error.field == "model"
    assert wrong.of(ModelLoading) == []  # refused before loading anything


def test_a_failing_job_does_not_kill_the_worker(worker: DeviceWorker) -> None:
    failing, next_one = RecordingSink(), RecordingSink()
    worker.submit(make_job("fail"), failing)
    worker.submit(make_job("fine"), next_one)
    failing.wait()
    next_one.wait()
    assert isinstance(failing.error, RuntimeError)
    assert next_one.error is None and len(next_one.of(ImageResult)) == 1


def test_cancelling_a_running_job_stops_it_at_the_next_step(worker: DeviceWorker, runner_: GatedRunner) -> None:
    sink = RecordingSink()
    ticket = worker.submit(make_job("hold", steps=50, base_steps=50), sink)
    assert runner_.holding.wait(WAIT_S)
    worker.cancel(ticket)
    runner_.release.set()
    sink.wait()
    assert isinstance(sink.error, JobCancelled)
    assert len(sink.of(Progress)) == 1 and sink.of(ImageResult) == []


def test_close_refuses_new_work_and_ends_queued_jobs(worker: DeviceWorker, runner_: GatedRunner) -> None:
    running, queued = RecordingSink(), RecordingSink()
    worker.submit(make_job("hold", steps=20, base_steps=20), running)
    assert runner_.holding.wait(WAIT_S)
    worker.submit(make_job("queued"), queued)
    closer = threading.Thread(target=worker.close, args=(WAIT_S,))
    closer.start()
    queued.wait()
    assert isinstance(queued.error, ShuttingDown)
    runner_.release.set()
    closer.join(WAIT_S)
    running.wait()
    assert isinstance(running.error, ShuttingDown)  # stopped at its next step
    with pytest.raises(ShuttingDown):
        worker.submit(make_job(), RecordingSink())
