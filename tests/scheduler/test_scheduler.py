"""The scheduler end to end on CPU workers, with stand-in pipelines: admission and overload, priorities,
positions, affinity, anti-thrash eviction, batching, deadlines, cancellation, failures and worker restarts.

Loading and denoising are stand-ins (tests/integration runs the real ones); the scheduler, its queue, its
residency, its threads and the model store are real. Budgets are set small to force eviction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from modelstore import ModelRecord, ModelStore, OnDemandPolicy, Role, StoreSettings, parse_air
from modelstore.components import components_of
from modelstore.errors import ModelNotFound, QuotaExceeded, WrongArchitecture
from server.core.domain import (
    ImageFormat,
    ImageResult,
    Job,
    JobEvent,
    LoadPhase,
    ModelLoading,
    PairKey,
    Progress,
    Queued,
    RefinerSpec,
    RenderShape,
    Sample,
    Sampler,
    Stage,
    StartPercentage,
)
from server.core.errors import DeadlineExceeded, JobCancelled, OutOfDeviceMemory, Overloaded, ShuttingDown, WorkerFailed
from server.core.settings import Settings, Speed
from server.generation.encoding import Encoder, encode_image
from server.generation.pipelines import PipelinePair
from server.generation.runner import RunResult, StageTimings, StepObserver, StepState
from server.scheduling.scheduler import Scheduler
from tests.conftest import TINY_BASE, TINY_REFINER
from tests.fakes import payloads
from tests.fakes.civitai import FakeCivitai, FakeFile
from tests.fixtures.tiny import another_base

WAIT_S = 60  # a hang fails the test; never an expectation about speed
# The tiny pair's own unique bytes in fp32: base 24.3 MB, refiner UNet 17.2 MB (VAE and OpenCLIP shared).
PAIR_MB = 42


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

    def wait(self) -> RecordingSink:
        assert self.closed.wait(WAIT_S), "the request never ended"
        return self

    def of(self, kind: type[Any]) -> list[Any]:
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]


class FakeLoader:
    """Returns stand-in pipelines with real component slots, and records what it loaded where."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, str, str, tuple[str, ...]]] = []  # (device, model, role, reused)
        self._lock = threading.Lock()

    def __call__(self, record: ModelRecord, *, role: str, device: str, dtype: Any, components: dict[str, Any]) -> Any:
        with self._lock:
            self.loads.append((device, record.canonical, role, tuple(sorted(components))))
        parts = {c.name: components.get(c.name) or object() for c in components_of(record)}
        return SimpleNamespace(
            components=parts,
            unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)),
            vae_scale_factor=8,
            device=device,
        )

    def count(self, model: str, device: str | None = None) -> int:
        return sum(1 for d, m, _, _ in self.loads if m == model and (device is None or d == device))


class Runner:
    """Reports each step like the real runner. A prompt starting with "hold" waits at its first step until
    `release`, one starting with "stall" until `unstall`; "fail" raises a bug; "die" raises what no job handler
    catches (a dying worker)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()
        self.unstall = threading.Event()
        self.stalling = threading.Event()
        self.batches: list[tuple[str, list[str]]] = []  # (device, prompts)

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult:
        self.batches.append((pair.base.device, [s.prompt for s in samples]))
        if samples[0].prompt == "fail":
            raise RuntimeError("a bug")
        if samples[0].prompt == "die":
            raise SystemExit("the worker thread dies")
        for overall in range(1, shape.steps + 1):
            stage = Stage.BASE if overall <= shape.base_steps else Stage.REFINER
            step = overall if stage is Stage.BASE else overall - shape.base_steps
            stage_steps = shape.base_steps if stage is Stage.BASE else shape.refiner_steps
            latents = torch.zeros(len(samples), 4, shape.height // 8, shape.width // 8)
            observer.on_step(StepState(stage, step, stage_steps, overall, shape.steps, latents, 1.0))
            if overall == 1 and samples[0].prompt.startswith("hold"):
                self.holding.set()
                assert self.release.wait(WAIT_S)
            if overall == 1 and samples[0].prompt.startswith("stall"):
                self.stalling.set()
                assert self.unstall.wait(WAIT_S)
        images = [Image.new("RGB", (shape.width, shape.height), (s.seed % 256, 0, 0)) for s in samples]
        return RunResult(images, StageTimings())


def job(prompt: str = "a cat", *, refiner: bool = True, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "request_id": prompt,
        "model": TINY_BASE,
        "refiner": RefinerSpec(parse_air(TINY_REFINER), StartPercentage(75)) if refiner else None,
        "prompt": prompt,
        "negative_prompt": None,
        "width": 0,
        "height": 0,
        "steps": 4,
        "base_steps": 3 if refiner else 4,
        "cfg_scale": 7.0,
        "seed": 10,
        "sampler": Sampler.EULER,
        "number_results": 1,
        "output_format": ImageFormat.PNG,
        "preview_every": 0,
    }
    values.update(fields)
    values["model"] = parse_air(str(values["model"]))  # the tests name models by their text
    return Job(**values)


def make(
    store_settings: StoreSettings, model_store: ModelStore, *, encode: Encoder = encode_image, **overrides: Any
) -> tuple[Scheduler, FakeLoader, Runner]:
    settings = Settings(store=store_settings, devices=("cpu",), pins=(), max_batch=1, budget_bytes=10**9)
    loader, runner = FakeLoader(), Runner()
    scheduler = Scheduler(replace(settings, **overrides), model_store, loader=loader, run=runner, encode=encode)
    scheduler.start()
    return scheduler, loader, runner


@pytest.fixture
def built(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[tuple[Scheduler, FakeLoader, Runner]]:
    made = make(store_settings, model_store)
    yield made
    made[2].release.set()
    made[0].close(WAIT_S)


def wait_resolved(scheduler: Scheduler) -> None:
    """Until every queued request's models are resolved (a blocked request cannot run yet)."""
    deadline = time.monotonic() + WAIT_S
    while any(t.spec is None for t in scheduler.queue.snapshot()):
        assert time.monotonic() < deadline, "requests never resolved"
        time.sleep(0.01)


def jobs(scheduler: Scheduler, outcome: str) -> float | None:
    return scheduler.metrics.registry.get_sample_value("refinery_jobs_total", {"outcome": outcome})


def positions(sink: RecordingSink) -> list[tuple[int, int]]:
    return [(q.position, q.queue_depth) for q in sink.of(Queued)]


def test_a_request_reports_loading_progress_and_images(built: tuple[Scheduler, FakeLoader, Runner]) -> None:
    scheduler, loader, _ = built
    sink = RecordingSink()
    scheduler.submit(job(number_results=2, preview_every=2), sink)
    assert sink.wait().error is None
    assert sink.of(ModelLoading) == [
        ModelLoading(TINY_BASE, Role.BASE, LoadPhase.LOADING),
        ModelLoading(TINY_BASE, Role.BASE, LoadPhase.READY),
        ModelLoading(TINY_REFINER, Role.REFINER, LoadPhase.LOADING),
        ModelLoading(TINY_REFINER, Role.REFINER, LoadPhase.READY),
    ]
    # The refiner got the base's VAE and OpenCLIP encoder instead of loading them again.
    assert loader.loads[1][2:] == ("refiner", ("text_encoder_2", "vae"))
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

    again = RecordingSink()
    scheduler.submit(job(), again)
    assert again.wait().of(ModelLoading) == []  # resident now: nothing loads


def test_model_errors_end_the_request_before_any_device_work(built: tuple[Scheduler, FakeLoader, Runner]) -> None:
    scheduler, loader, runner = built
    unknown = RecordingSink()
    scheduler.submit(job(refiner=False, model="builtin:nope@1"), unknown)
    assert isinstance(unknown.wait().error, ModelNotFound) and unknown.error.air == "builtin:nope@1"
    wrong = RecordingSink()
    scheduler.submit(job(refiner=False, model=TINY_REFINER), wrong)
    assert isinstance(wrong.wait().error, WrongArchitecture) and wrong.error.role is Role.BASE
    assert loader.loads == [] and runner.batches == []


def test_overload_is_refused_at_once_and_every_admitted_request_completes(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    scheduler, _, runner = make(store_settings, model_store, max_queue=3)
    try:
        running = RecordingSink()
        scheduler.submit(job("hold"), running)
        assert runner.holding.wait(WAIT_S)
        admitted = [RecordingSink() for _ in range(3)]
        for i, sink in enumerate(admitted):
            scheduler.submit(job(f"queued {i}"), sink)
        with pytest.raises(Overloaded) as refused:
            scheduler.submit(job("one too many"), RecordingSink())
        assert refused.value.retry_after_s >= 1.0
        runner.release.set()
        for sink in [running, *admitted]:
            assert sink.wait().error is None and len(sink.of(ImageResult)) == 1
        assert jobs(scheduler, "rejected") == 1
    finally:
        runner.release.set()
        scheduler.close(WAIT_S)


def test_higher_priority_runs_first_and_positions_are_re_announced(
    built: tuple[Scheduler, FakeLoader, Runner],
) -> None:
    scheduler, _, runner = built
    running = RecordingSink()
    scheduler.submit(job("hold"), running)
    assert runner.holding.wait(WAIT_S)
    low, urgent = RecordingSink(), RecordingSink()
    scheduler.submit(job("low"), low)
    scheduler.submit(job("urgent", priority=10), urgent)
    assert positions(low) == [(0, 1), (1, 2)]  # told again when the urgent request overtook it
    assert positions(urgent) == [(0, 2)]
    wait_resolved(scheduler)
    runner.release.set()
    low.wait()
    urgent.wait()
    order = [prompts[0] for _, prompts in runner.batches]
    assert order == ["hold", "urgent", "low"]


def test_cancelling_queued_and_running_requests(built: tuple[Scheduler, FakeLoader, Runner]) -> None:
    scheduler, _, runner = built
    running, queued, after = RecordingSink(), RecordingSink(), RecordingSink()
    running_ticket = scheduler.submit(job("hold", steps=50, base_steps=40), running)
    assert runner.holding.wait(WAIT_S)
    queued_ticket = scheduler.submit(job("queued"), queued)
    scheduler.submit(job("after"), after)
    scheduler.cancel(queued_ticket)
    assert isinstance(queued.wait().error, JobCancelled) and queued.of(Progress) == []
    scheduler.cancel(running_ticket)
    runner.release.set()
    assert isinstance(running.wait().error, JobCancelled)
    assert len(running.of(Progress)) == 1 and running.of(ImageResult) == []  # stopped at the next step
    assert after.wait().error is None  # and the device went on to the next request
    assert [p[0] for _, p in runner.batches] == ["hold", "after"]


def test_a_deadline_that_passes_in_the_queue_never_reaches_a_device(
    built: tuple[Scheduler, FakeLoader, Runner],
) -> None:
    scheduler, _, runner = built
    running, late = RecordingSink(), RecordingSink()
    scheduler.submit(job("hold"), running)
    assert runner.holding.wait(WAIT_S)
    scheduler.submit(job("late"), late, deadline=time.monotonic() + 0.3)
    assert isinstance(late.wait().error, DeadlineExceeded)  # ended while the device was still busy
    runner.release.set()
    running.wait()
    assert [p[0] for _, p in runner.batches] == ["hold"]
    assert jobs(scheduler, "deadline_exceeded") == 1


def test_compatible_requests_run_as_one_batch_and_each_gets_its_own_results(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    scheduler, _, runner = make(store_settings, model_store, max_batch=4)
    try:
        first = RecordingSink()
        scheduler.submit(job("hold"), first)
        assert runner.holding.wait(WAIT_S)
        a, b, c, other = RecordingSink(), RecordingSink(), RecordingSink(), RecordingSink()
        scheduler.submit(job("a", seed=100, number_results=2), a)
        scheduler.submit(job("b", seed=200), b)
        scheduler.submit(job("other shape", steps=6, base_steps=5), other)
        scheduler.submit(job("c", seed=300), c)
        wait_resolved(scheduler)
        runner.release.set()
        for sink in (first, a, b, c, other):
            assert sink.wait().error is None
        assert [prompts for _, prompts in runner.batches][1:] == [["a", "a", "b", "c"], ["other shape"]]
        assert [(i.index, i.seed) for i in a.of(ImageResult)] == [(0, 100), (1, 101)]
        assert [(i.index, i.seed) for i in b.of(ImageResult)] == [(0, 200)]
        assert all(p.image_indices == (0,) for p in b.of(Progress)) and len(b.of(Progress)) == 4
    finally:
        runner.release.set()
        scheduler.close(WAIT_S)


def test_a_cancelled_batch_mate_leaves_the_others_running(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    scheduler, _, runner = make(store_settings, model_store, max_batch=2)
    try:
        blocker, mate, leaving = RecordingSink(), RecordingSink(), RecordingSink()
        scheduler.submit(job("hold"), blocker)  # keeps the device busy until both mates are queued
        assert runner.holding.wait(WAIT_S)
        scheduler.submit(job("stall mate", steps=6, base_steps=5), mate)
        ticket = scheduler.submit(job("stall leaving", steps=6, base_steps=5), leaving)
        wait_resolved(scheduler)
        runner.release.set()
        assert runner.stalling.wait(WAIT_S)
        scheduler.cancel(ticket)
        runner.unstall.set()
        assert isinstance(leaving.wait().error, JobCancelled) and leaving.of(ImageResult) == []
        assert mate.wait().error is None and len(mate.of(Progress)) == 6 and len(mate.of(ImageResult)) == 1
        assert runner.batches[1][1] == ["stall mate", "stall leaving"]  # they really ran together
    finally:
        runner.release.set()
        runner.unstall.set()
        scheduler.close(WAIT_S)


def test_a_failing_request_leaves_the_worker_serving(built: tuple[Scheduler, FakeLoader, Runner]) -> None:
    scheduler, _, _ = built
    failing, fine = RecordingSink(), RecordingSink()
    scheduler.submit(job("fail"), failing)
    scheduler.submit(job("fine"), fine)
    assert isinstance(failing.wait().error, RuntimeError)
    assert fine.wait().error is None and len(fine.of(ImageResult)) == 1


def test_a_dead_worker_is_restarted_and_its_requests_end_unavailable(
    built: tuple[Scheduler, FakeLoader, Runner],
) -> None:
    scheduler, _, _ = built
    dying, next_one = RecordingSink(), RecordingSink()
    scheduler.submit(job("die"), dying)
    assert isinstance(dying.wait().error, WorkerFailed)  # UNAVAILABLE, not silence
    scheduler.submit(job("next"), next_one)
    assert next_one.wait().error is None
    assert scheduler.workers[0].restarts == 1


def test_lru_eviction_under_a_small_budget_and_no_thrash(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    """Room for one pair only. While requests for the resident pair wait, a request for another pair does not
    evict it: the device serves the waiting ones first, then switches once."""
    scheduler, loader, runner = make(store_settings, model_store, budget_bytes=(PAIR_MB + 10) * 10**6)
    try:
        warm = RecordingSink()
        scheduler.submit(job("hold warm"), warm)
        assert runner.holding.wait(WAIT_S)
        base_only, same_pair = RecordingSink(), RecordingSink()
        scheduler.submit(job("base only", refiner=False), base_only)  # another pair: (base, no refiner)
        scheduler.submit(job("same pair"), same_pair)
        wait_resolved(scheduler)
        runner.release.set()
        for sink in (warm, base_only, same_pair):
            assert sink.wait().error is None
        order = [p[0] for _, p in runner.batches]
        assert order == ["hold warm", "same pair", "base only"]  # affinity first, then one switch
        assert loader.count(TINY_REFINER) == 1
    finally:
        runner.release.set()
        scheduler.close(WAIT_S)


def test_affinity_with_two_cpu_workers(store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path) -> None:
    """Each device keeps serving the pair it holds; no pair is loaded twice."""
    other = another_base(model_store, tmp_path)
    scheduler, loader, runner = make(store_settings, model_store, devices=("cpu:0", "cpu:1"), max_batch=4)
    try:
        first, second = RecordingSink(), RecordingSink()
        scheduler.submit(job("hold pair"), first)
        assert runner.holding.wait(WAIT_S)  # one device busy with the pair: the other takes the second model
        scheduler.submit(job("other", refiner=False, model=other), second)
        assert second.wait().error is None
        runner.release.set()
        assert first.wait().error is None
        homes = {prompts[0]: device for device, prompts in runner.batches}
        assert homes["hold pair"] != homes["other"]

        sinks = []
        for i in range(6):  # one after another, then all at once
            sink = RecordingSink()
            if i % 2:
                scheduler.submit(job("other", refiner=False, model=other), sink)
            else:
                scheduler.submit(job("pair"), sink)
            sinks.append(sink)
            if i < 2:
                assert sink.wait().error is None
        for sink in sinks:
            assert sink.wait().error is None
        for device, prompts in runner.batches[2:]:
            home = homes["hold pair"] if prompts[0] == "pair" else homes["other"]
            assert device == home, f"{prompts[0]} ran on {device}, away from its pair on {home}"
        assert loader.count(TINY_BASE) == 1 and loader.count(TINY_REFINER) == 1 and loader.count(other) == 1
    finally:
        runner.release.set()
        scheduler.close(WAIT_S)


def test_close_refuses_new_work_and_ends_queued_requests(built: tuple[Scheduler, FakeLoader, Runner]) -> None:
    scheduler, _, runner = built
    running, queued = RecordingSink(), RecordingSink()
    scheduler.submit(job("hold", steps=20, base_steps=15), running)
    assert runner.holding.wait(WAIT_S)
    scheduler.submit(job("queued"), queued)
    closer = threading.Thread(target=scheduler.close, args=(WAIT_S,))
    closer.start()
    assert isinstance(queued.wait().error, ShuttingDown)
    runner.release.set()
    closer.join(WAIT_S)
    assert isinstance(running.wait().error, ShuttingDown)  # stopped at its next step
    with pytest.raises(ShuttingDown):
        scheduler.submit(job(), RecordingSink())


def test_a_request_that_cannot_fit_beside_the_pinned_pair_is_refused_at_once(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    """Pinned pairs are never evicted: waiting for room they hold would wait forever."""
    other = another_base(model_store, tmp_path)
    pair = f"{TINY_BASE}+{TINY_REFINER}"
    scheduler, loader, runner = make(store_settings, model_store, budget_bytes=(PAIR_MB + 3) * 10**6)
    try:
        scheduler.pin([PairKey.parse(pair)]).result(WAIT_S)
        refused, fine = RecordingSink(), RecordingSink()
        scheduler.submit(job("another base", refiner=False, model=other), refused)
        assert isinstance(refused.wait().error, OutOfDeviceMemory)  # RESOURCE_EXHAUSTED, not a hang
        scheduler.submit(job("the pinned pair"), fine)
        assert fine.wait().error is None and loader.count(other) == 0
    finally:
        runner.release.set()
        scheduler.close(WAIT_S)


class BlockingEncoder:
    """Stands in for `encode_image`: the first image it is given waits until `release`; `fail` makes the
    first one raise instead."""

    def __init__(self, *, fail: bool = False) -> None:
        self.encoding = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.thread: threading.Thread | None = None  # where the first image was encoded
        self._first = True

    def __call__(self, image: Image.Image, output_format: ImageFormat) -> bytes:
        first, self._first = self._first, False
        if first:
            self.thread = threading.current_thread()
        if first and self.fail:
            raise OSError("the encoder broke")
        if first:
            self.encoding.set()
            assert self.release.wait(WAIT_S)
        return b"encoded"


def test_the_device_runs_the_next_batch_while_the_last_one_is_encoded(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    encoder = BlockingEncoder()
    scheduler, _, runner = make(store_settings, model_store, encode=encoder)
    try:
        _next_batch_while_encoding(scheduler, runner, encoder)
    finally:
        encoder.release.set()
        scheduler.close(WAIT_S)


def _next_batch_while_encoding(scheduler: Scheduler, runner: Runner, encoder: BlockingEncoder) -> None:
    first, second = RecordingSink(), RecordingSink()
    scheduler.submit(job("first"), first)
    assert encoder.encoding.wait(WAIT_S)
    scheduler.submit(job("second"), second)

    # The first request's image is still being encoded, and the device has already denoised the second.
    assert second.wait().error is None and [r.data for r in second.of(ImageResult)] == [b"encoded"]
    assert not first.closed.is_set() and first.of(ImageResult) == []
    encoder.release.set()
    assert first.wait().error is None and [r.data for r in first.of(ImageResult)] == [b"encoded"]
    assert [prompts for _, prompts in runner.batches] == [["first"], ["second"]]


def test_with_no_encode_threads_the_device_waits_for_the_encoding(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    encoder = BlockingEncoder()
    scheduler, _, runner = make(store_settings, model_store, encode_threads=0, encode=encoder)
    try:
        first, second = RecordingSink(), RecordingSink()
        scheduler.submit(job("first"), first)
        assert encoder.encoding.wait(WAIT_S)
        scheduler.submit(job("second"), second)
        wait_resolved(scheduler)
        # The encoding holds the device's own worker thread, so that worker cannot take the second request.
        assert encoder.thread is not None and encoder.thread.name == f"refinery-{scheduler.workers[0].device.name}"
        assert [prompts for _, prompts in runner.batches] == [["first"]]
        encoder.release.set()
        assert first.wait().error is None and second.wait().error is None
        assert [prompts for _, prompts in runner.batches] == [["first"], ["second"]]
    finally:
        encoder.release.set()
        scheduler.close(WAIT_S)


def test_an_encoding_failure_ends_its_request_and_the_next_one_is_served(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    scheduler, _, _ = make(store_settings, model_store, encode=BlockingEncoder(fail=True))
    try:
        _failure_then_fine(scheduler)
    finally:
        scheduler.close(WAIT_S)


def _failure_then_fine(scheduler: Scheduler) -> None:
    broken, fine = RecordingSink(), RecordingSink()
    scheduler.submit(job("broken"), broken)
    assert isinstance(broken.wait().error, OSError) and broken.of(ImageResult) == []
    scheduler.submit(job("fine"), fine)
    assert fine.wait().error is None and len(fine.of(ImageResult)) == 1


def test_close_sends_the_images_being_encoded(store_settings: StoreSettings, model_store: ModelStore) -> None:
    encoder = BlockingEncoder()
    scheduler, _, _ = make(store_settings, model_store, encode=encoder)
    sink = RecordingSink()
    scheduler.submit(job("finished"), sink)
    assert encoder.encoding.wait(WAIT_S)
    closer = threading.Thread(target=scheduler.close, args=(WAIT_S,))
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # close waits for the image rather than dropping it
    encoder.release.set()
    closer.join(WAIT_S)
    assert sink.wait().error is None and len(sink.of(ImageResult)) == 1


def test_a_pair_pinned_at_run_time_stays_until_it_is_unpinned(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    other = another_base(model_store, tmp_path)
    pair = PairKey(parse_air(TINY_BASE), parse_air(TINY_REFINER))
    scheduler, _, runner = make(store_settings, model_store, budget_bytes=(PAIR_MB + 3) * 10**6)
    try:
        scheduler.pin([pair]).result(WAIT_S)
        assert [(p.key, p.pinned) for p in scheduler.workers[0].residency.resident()] == [(pair, True)]
        refused = RecordingSink()
        scheduler.submit(job("another base", refiner=False, model=other), refused)
        assert isinstance(refused.wait().error, OutOfDeviceMemory)  # no room beside the pinned pair

        assert scheduler.unpin(pair) and not scheduler.unpin(pair)
        assert [(p.key, p.pinned) for p in scheduler.workers[0].residency.resident()] == [(pair, False)]
        served = RecordingSink()
        scheduler.submit(job("another base", refiner=False, model=other), served)
        assert served.wait().error is None
        assert not scheduler.workers[0].residency.holds(pair)  # evicted for it, as any idle pair
    finally:
        runner.release.set()
        scheduler.close(WAIT_S)


def test_a_pair_that_cannot_fit_beside_the_pinned_ones_is_refused_and_nothing_loads(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    other = PairKey(parse_air(another_base(model_store, tmp_path)), None)
    pair = PairKey(parse_air(TINY_BASE), parse_air(TINY_REFINER))
    scheduler, loader, runner = make(store_settings, model_store, budget_bytes=(PAIR_MB + 3) * 10**6)
    try:
        scheduler.pin([pair]).result(WAIT_S)
        with pytest.raises(OutOfDeviceMemory):
            scheduler.pin([other]).result(WAIT_S)
        assert loader.count(other.base) == 0
        assert [(p.key, p.pinned) for p in scheduler.workers[0].residency.resident()] == [(pair, True)]
    finally:
        runner.release.set()
        scheduler.close(WAIT_S)


def test_a_queued_request_holds_its_models_against_a_pull_under_quota_pressure(
    tmp_path: Path, civitai: FakeCivitai
) -> None:
    """From the moment a request's models are resolved until it ends, they are in use: a pull that needs their
    room is refused (QuotaExceeded) instead of evicting them from under the waiting request."""
    size = 400_000
    for n in (1, 2, 3):
        checkpoint = payloads.checkpoint("base", seed=n, extra_bytes=size)
        civitai.add_version(n, n * 10, [(FakeFile(n * 100, f"m{n}.safetensors"), checkpoint)])
    running, queued, pulled = "civitai:1@10", "civitai:2@20", "civitai:3@30"
    settings = StoreSettings(
        cache_dir=tmp_path / "cache",
        civitai_api=civitai.url,
        max_bytes=int(2 * (size + 4_500_000)),
        on_demand=OnDemandPolicy.parse("any"),  # the requests download their models (off by default)
    )
    store = ModelStore(settings)
    scheduler, _, runner = make(settings, store)
    try:
        first, second = RecordingSink(), RecordingSink()
        scheduler.submit(job("hold", refiner=False, model=running), first)
        assert runner.holding.wait(WAIT_S)  # the device is busy with the first model
        scheduler.submit(job("waiting", refiner=False, model=queued), second)
        wait_resolved(scheduler)  # the second model is in the cache; its request waits for the device

        with pytest.raises(QuotaExceeded):
            store.pull(pulled)  # the least recently used model is the queued request's, and it is in use
        assert store.lookup(queued) is not None

        runner.release.set()
        assert first.wait().error is None and second.wait().error is None
    finally:
        runner.release.set()
        scheduler.close(WAIT_S)
        store.close()


def test_results_are_encoded_at_the_configured_png_level(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    sizes = {}
    for level in (0, 9):
        settings = Settings(store=store_settings, devices=("cpu",), pins=(), speed=Speed(png_level=level))
        runner = Runner()
        scheduler = Scheduler(settings, model_store, loader=FakeLoader(), run=runner)  # the real encoder
        scheduler.start()
        try:
            sink = RecordingSink()
            scheduler.submit(job("a gradient"), sink)
            assert sink.wait().error is None
            (image,) = sink.of(ImageResult)
            sizes[level] = len(image.data)
        finally:
            runner.release.set()
            scheduler.close(WAIT_S)
    assert sizes[0] > sizes[9]
