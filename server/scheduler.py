"""The device scheduler: admission, placement and batching in front of one worker per device.

A request's life here (the servicer only calls `submit` and `cancel`):

1. **Admission.** `submit` puts it in the bounded priority queue (`server/admission.py`) at once, or refuses it
   with RESOURCE_EXHAUSTED + RetryInfo when the queue is full. Nothing waits unboundedly.
2. **Resolution.** While it waits, a resolver thread turns its AIRs into cached models (downloading if needed,
   reported as `ModelLoading` DOWNLOADING events), checks their architecture for the role, and sizes them from
   their headers. Until then it is *blocked*: no device takes it. A model that is unknown, of the wrong
   architecture, or too large for every device ends the request here, before it costs a device anything.
3. **Placement.** A free device takes the first request (by priority, then arrival) whose pair it already
   holds; failing that, one whose pair no other device holds and that fits here without evicting a pair some
   queued request waits for (no thrash); failing that, it helps with a pair another busy device holds when two
   or more requests wait for it. A pair is loaded where loading costs least (shared components count).
4. **Batching.** With it come up to `max_batch` images of requests with the same pair and the same shape (size,
   steps, split, scheduler, guidance); each keeps its own prompt, seed and generator (`server/runner.py` encodes
   each prompt alone), so each image equals the one it would get alone, up to float rounding between batch
   sizes.
5. **Execution** on the device's worker thread (`server/execution.py`). A cancelled request leaves the queue,
   or stops receiving events at the next step; its batch mates go on, and the run stops once none is left.
6. **Delivery.** The finished images are encoded and sent on an encoder thread (`encode_threads`) while the
   worker already takes its next batch: the device does not wait for PNG compression.

Faults: running out of device memory evicts every idle pair and retries once, then ends the batch with
RESOURCE_EXHAUSTED; a failing batch never kills its worker; a worker thread that dies anyway is restarted and
the requests it held end with UNAVAILABLE.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from modelstore import ModelStore, require_role
from modelstore.components import components_of
from modelstore.errors import ModelStoreError
from modelstore.loading import load_pipeline
from modelstore.progress import DownloadProgress, ProgressFanout
from server import execution, runner
from server.admission import Entry as QueueEntry
from server.admission import JobQueue
from server.device import DeviceSpec, leave_a_core_for_io, resolve_device
from server.dispatch import EventSink, Ticket
from server.errors import DeadlineExceeded, OutOfDeviceMemory, ShuttingDown, WorkerFailed
from server.job import GenerationJob, LoadPhase, ModelLoading, ModelRole, Queued
from server.metrics import Metrics
from server.pins import parse_pin
from server.residency import LoadReport, ModelSpec, PairKey, PairSpec, Residency, ResidentPair
from server.settings import Settings

log = logging.getLogger(__name__)

# How often an idle worker wakes to expire deadlines and run control calls.
_TICK_S = 0.25
# Progress events while downloading: at most this often per request (the last one is always sent).
_DOWNLOAD_EVENT_S = 0.25


@dataclass(eq=False)
class Work:
    """Everything the scheduler knows about one admitted request."""

    handle: Ticket
    deadline: float | None  # time.monotonic()
    spec: PairSpec | None = None  # set once resolved
    queue_entry: QueueEntry | None = None
    # For the request's log line: when a device took it (perf_counter), and where its time went there.
    started: float = 0.0
    loading_s: float = 0.0
    encode_s: float = 0.0
    run_timings: runner.StageTimings | None = None

    @property
    def job(self) -> GenerationJob:
        return self.handle.job


def pair_key(job: GenerationJob) -> PairKey:
    return PairKey(job.model, job.refiner.model if job.refiner is not None else None)


def batch_key(job: GenerationJob) -> Hashable:
    """Requests with equal keys can be denoised together (prompts, seeds and result counts may differ)."""
    return (pair_key(job), job.width, job.height, job.steps, job.base_steps, job.cfg_scale, job.scheduler)


def device_budget(device: DeviceSpec, settings: Settings) -> int:
    """Bytes of model weights a device may hold: the configured budget, else the device's memory less a
    headroom fraction for activations, the VAE decode and the allocator's slack."""
    if settings.budget_bytes:
        return settings.budget_bytes
    if torch.device(device.name).type == "cuda":
        total = torch.cuda.get_device_properties(torch.device(device.name)).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * (1.0 - settings.headroom_fraction))


def release_device_memory(device: DeviceSpec) -> Callable[[], None]:
    def release() -> None:
        import gc

        gc.collect()
        if torch.device(device.name).type == "cuda":
            with torch.cuda.device(torch.device(device.name)):
                torch.cuda.empty_cache()

    return release


@dataclass(frozen=True)
class DeviceStatus:
    name: str
    budget_bytes: int
    resident_bytes: int
    allocated_bytes: int
    pairs: tuple[ResidentPair, ...]
    jobs_running: int


@dataclass(frozen=True)
class SchedulerStatus:
    devices: tuple[DeviceStatus, ...]
    queue_depth: int
    max_queue: int
    depth_by_priority: dict[int, int] = field(default_factory=dict)

    @property
    def jobs_running(self) -> int:
        return sum(d.jobs_running for d in self.devices)


class Scheduler:
    """A `server.dispatch.Dispatcher` over one worker per device. `start()` once, `close()` at the end."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        *,
        loader: Callable[..., Any] = load_pipeline,
        run: execution.PipelineRunner = runner.run,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.queue = JobQueue(settings.max_queue)
        self.loader = loader
        self.run_pipeline = run
        self._lock = threading.Lock()
        self._works: dict[int, Work] = {}  # id(handle) -> work, for every request not yet ended
        self._closed = False
        self._stopping = threading.Event()
        self._resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="refinery-resolve")
        self._encoders = (
            ThreadPoolExecutor(max_workers=settings.encode_threads, thread_name_prefix="refinery-encode")
            if settings.encode_threads
            else None
        )
        devices = _unique([resolve_device(name) for name in settings.devices])
        self.workers = [DeviceWorker(self, device, i) for i, device in enumerate(devices)]
        self.metrics.registry.register(_StatusCollector(self))

    # ---- Dispatcher -------------------------------------------------------------------------------------

    def submit(self, job: GenerationJob, sink: EventSink, *, deadline: float | None = None) -> Ticket:
        handle = Ticket(job, sink)
        work = Work(handle, deadline)
        queue_entry = QueueEntry(
            payload=work,
            priority=job.priority,
            batch_key=batch_key(job),
            pair=pair_key(job),
            deadline=deadline,
            on_position=lambda position, depth: self._announce(work, position, depth),
            blocked=True,
        )
        work.queue_entry = queue_entry
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            self._works[id(handle)] = work
        try:
            self.queue.submit(queue_entry)
        except Exception:
            with self._lock:
                self._works.pop(id(handle), None)
            self.metrics.jobs.labels("rejected").inc()
            raise
        self._resolver.submit(self._resolve, work)
        return handle

    def cancel(self, ticket: Ticket) -> None:
        ticket.request_cancel()
        work = self._work(ticket)
        if work is not None and work.queue_entry is not None and self.queue.cancel(work.queue_entry):
            self.finish(work, ticket.cancel_error)  # never started; a running one stops at its next step

    # ---- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.workers and all(torch.device(w.device.name).type == "cpu" for w in self.workers):
            threads = leave_a_core_for_io(self.workers[0].device)
            if threads is not None:
                log.info("using %d CPU thread(s) for generation, leaving one core for serving", threads)
        for worker in self.workers:
            worker.start()
        threading.Thread(target=self._reap, name="refinery-deadlines", daemon=True).start()

    def _reap(self) -> None:
        """End queued requests whose deadline passed, even while every device is busy."""
        while not self._stopping.wait(_TICK_S):
            self.expire()

    def pin(self, pins: Sequence[str]) -> Future[None]:
        """Load each "BASE[+REFINER]" pair on every device and keep it there (`--pin`)."""
        return self.pin_pairs([parse_pin(text) for text in pins])

    def pin_pairs(self, keys: Sequence[PairKey]) -> Future[None]:
        """Load each pair on every device and keep it there; the future completes once all are resident, or
        fails with the first error, leaving none of them newly pinned (a pair that cannot fit beside those
        already pinned is refused before anything loads)."""
        done: Future[None] = Future()
        pinned_before = {p.key for w in self.workers for p in w.residency.resident() if p.pinned}

        def load_all() -> None:
            specs: list[PairSpec] = []
            try:
                specs = [self._pair_spec(key, sink=None) for key in keys]
                for spec in specs:
                    for w in self.workers:
                        if not w.residency.could_ever_fit(spec):
                            raise OutOfDeviceMemory(
                                f"{spec.key} cannot fit on {w.device.name} beside the pairs pinned there "
                                f"(budget {w.residency.budget_bytes / 2**20:.0f} MiB)"
                            )
                futures = [w.call(functools.partial(w.pin, spec)) for w in self.workers for spec in specs]
                failures = [f.exception() for f in futures]  # every load ends before any rollback
                for failure in failures:
                    if failure is not None:
                        raise failure
            except BaseException as exc:
                for spec in specs:
                    if spec.key not in pinned_before:
                        self.unpin_pair(spec.key)
                done.set_exception(exc)
            else:
                done.set_result(None)

        threading.Thread(target=load_all, name="refinery-pin", daemon=True).start()
        return done

    def unpin_pair(self, key: PairKey) -> bool:
        """Let `key` be evicted again on every device; whether any device held it pinned."""
        return any([w.residency.unpin(key) for w in self.workers])  # a list: unpin on every device

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new work, end queued requests with UNAVAILABLE, stop running ones at their next step, and
        wait up to `timeout_s` for the workers."""
        with self._lock:
            self._closed = True
            works = list(self._works.values())
        stopping = ShuttingDown("the server is shutting down; retry on another replica")
        for work in works:
            work.handle.request_cancel(stopping)
        for queue_entry in self.queue.close():
            self.finish(queue_entry.payload, stopping)
        self._stopping.set()
        for worker in self.workers:
            worker.stop(timeout_s)
        self._resolver.shutdown(wait=False, cancel_futures=True)
        if self._encoders is not None:
            self._encoders.shutdown(wait=True)  # finished images still get sent: each takes well under a second

    # ---- views ------------------------------------------------------------------------------------------

    def status(self) -> SchedulerStatus:
        devices = tuple(w.status() for w in self.workers)
        return SchedulerStatus(devices, self.queue.depth(), self.queue.max_queue, self.queue.depth_by_priority())

    def resident_models(self) -> set[str]:
        return {
            model
            for w in self.workers
            for pair in w.residency.resident()
            for model in (pair.key.base, pair.key.refiner)
            if model is not None
        }

    # ---- used by the workers ----------------------------------------------------------------------------

    def deliver(self, send: Callable[[], None]) -> None:
        """Run `send` (encode a finished request's images and send them) on an encoder thread, so the device
        worker goes on to its next batch meanwhile; on the caller's thread when `encode_threads` is 0.
        Raises RuntimeError once the scheduler is closed."""
        if self._encoders is None:
            send()
        else:
            self._encoders.submit(send)

    def finish(self, work: Work, error: BaseException | None, *, steps_done: int = 0) -> None:
        """End a request exactly once: close its stream, count and log its outcome."""
        with self._lock:
            if self._works.pop(id(work.handle), None) is None:
                return
        work.handle.sink.close(error)
        outcome = execution.outcome_of(error)
        self.metrics.jobs.labels(outcome).inc()
        execution.log_outcome(work, error, outcome, steps_done)

    def expire(self) -> None:
        for queue_entry in self.queue.expire():
            self.finish(queue_entry.payload, DeadlineExceeded("the deadline passed while the request was queued"))

    def waiting_pairs(self) -> set[Hashable]:
        return self.queue.waiting_pairs()

    # ---- internals --------------------------------------------------------------------------------------

    def _work(self, ticket: Ticket) -> Work | None:
        with self._lock:
            return self._works.get(id(ticket))

    def _announce(self, work: Work, position: int, depth: int) -> None:
        if not work.handle.cancel_requested:
            work.handle.queued_position = position
            work.handle.sink.emit(Queued(position=position, queue_depth=depth))

    def _resolve(self, work: Work) -> None:
        """On a resolver thread: make the request's models available and check they can run anywhere."""
        assert work.queue_entry is not None
        try:
            spec = self._pair_spec(pair_key(work.job), sink=work.handle.sink, give_up=work.handle.cancel_signal)
            if not any(w.residency.could_ever_fit(spec) for w in self.workers):
                budgets = ", ".join(
                    f"{w.device.name}: {w.residency.budget_bytes / 2**20:.0f} MiB" for w in self.workers
                )
                raise OutOfDeviceMemory(f"{spec.key} cannot fit on any device beside the pinned pairs ({budgets})")
        except BaseException as exc:
            if not isinstance(exc, (ModelStoreError, OutOfDeviceMemory)):
                log.error("resolving request %s failed", work.job.request_id, exc_info=exc)
            if self.queue.cancel(work.queue_entry):
                self.finish(work, exc)
            return
        work.spec = spec
        self.queue.unblock(work.queue_entry)

    def _pair_spec(self, key: PairKey, sink: EventSink | None, give_up: threading.Event | None = None) -> PairSpec:
        """Resolve the pair's models (downloading them if needed); a request that is cancelled meanwhile
        sets `give_up`, which stops a download nobody else waits for."""
        base = self._model_spec(key.base, ModelRole.BASE, sink, give_up)
        refiner = None if key.refiner is None else self._model_spec(key.refiner, ModelRole.REFINER, sink, give_up)
        return PairSpec(key, base, refiner)

    def _model_spec(
        self, model: str, role: ModelRole, sink: EventSink | None, give_up: threading.Event | None
    ) -> ModelSpec:
        progress = None if sink is None else _DownloadReporter(model, role, sink)
        try:
            record = self.store.resolve(model, progress=progress, give_up=give_up)
            require_role(record, role.value)
        except ModelStoreError as exc:
            raise exc.for_field(role.field) from None
        # The first use of a model reads all its weights to fingerprint its components: a wait worth showing.
        measuring = ProgressFanout(record.canonical)
        measuring.set_verifying()
        if progress is not None:
            measuring.subscribe(progress)
        components = components_of(record, self.settings.store.cache_dir, measuring)
        if measuring.counted:
            measuring.finish()
        return ModelSpec(record, role.value, components)


class _DownloadReporter:
    """Turns the store's progress into `ModelLoading` DOWNLOADING (or VERIFYING: local bytes being hashed)
    events, a few per second."""

    def __init__(self, model: str, role: ModelRole, sink: EventSink) -> None:
        self._model, self._role, self._sink = model, role, sink
        self._last = 0.0

    def __call__(self, progress: DownloadProgress) -> None:
        now = time.monotonic()
        if not progress.finished and now - self._last < _DOWNLOAD_EVENT_S:
            return
        self._last = now
        self._sink.emit(
            ModelLoading(
                self._model,
                self._role,
                LoadPhase.VERIFYING if progress.verifying else LoadPhase.DOWNLOADING,
                bytes_done=progress.bytes_done,
                bytes_total=progress.bytes_total or 0,
                bytes_per_second=progress.rate_bps,
            )
        )


class DeviceWorker:
    """One thread, one device, its residency. The thread is restarted if it ever dies."""

    def __init__(self, scheduler: Scheduler, device: DeviceSpec, index: int) -> None:
        self.scheduler = scheduler
        self.device = device
        self.index = index
        settings = scheduler.settings
        self.residency = Residency(
            device.name,
            device_budget(device, settings),
            half=device.dtype in (torch.float16, torch.bfloat16),
            load=self._load,
            release_memory=release_device_memory(device),
            on_unload=self._unload,
        )
        self.busy = False
        self.running: list[Work] = []
        self.restarts = 0
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._calls_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        scheduler.metrics.budget_bytes.labels(device.name).set(self.residency.budget_bytes)

    # ---- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name=f"refinery-{self.device.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None) -> None:
        self._stopping.set()
        self.scheduler.queue.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on this worker's thread between batches (residency changes only happen there)."""
        future: Future[Any] = Future()
        with self._calls_lock:
            self._calls.append((fn, future))
        self.scheduler.queue.notify()
        return future

    def pin(self, spec: PairSpec) -> None:
        protected = {k for k in self.scheduler.waiting_pairs() if isinstance(k, PairKey)}
        _, report = self.residency.acquire(spec, protected, pin=True)
        self.residency.release(spec.key)
        self.observe_load(report)

    def status(self) -> DeviceStatus:
        allocated = 0
        if torch.device(self.device.name).type == "cuda":
            allocated = int(torch.cuda.memory_allocated(torch.device(self.device.name)))
        return DeviceStatus(
            self.device.name,
            self.residency.budget_bytes,
            self.residency.used_bytes,
            allocated,
            tuple(self.residency.resident()),
            len(self.running),
        )

    # ---- the thread -------------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            try:
                self._loop()
            except BaseException as exc:  # a bug outside any one batch: never leave requests hanging
                self.restarts += 1
                log.critical("device worker %s died; restarting it", self.device.name, exc_info=exc)
                failed = WorkerFailed(f"the worker for {self.device.name} failed; retry the request")
                for work in self.running:
                    self.scheduler.finish(work, failed)
                self.running = []
                self.busy = False
                time.sleep(0.1)  # do not spin if the failure repeats at once

    def _loop(self) -> None:
        scheduler = self.scheduler
        while not self._stopping.is_set():
            self._run_calls()
            tickets = scheduler.queue.take(
                self._choose,
                max_batch=scheduler.settings.max_batch,
                weight=lambda t: int(t.payload.job.number_results),
                timeout=_TICK_S,
            )
            if not tickets:
                continue
            # Cleared only when the batch returns: if the thread dies inside it, _supervise still knows
            # which requests to end.
            self.running = [t.payload for t in tickets]
            self.busy = True
            execution.run_batch(self, self.running)
            self.running = []
            self.busy = False

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _choose(self, runnable: list[QueueEntry]) -> QueueEntry | None:
        """Which queued request this device takes next (called under the queue's lock; must be quick)."""
        if self._calls or self._stopping.is_set():
            return None  # control calls (pins) go first; take() is retried after the tick
        now = time.monotonic()
        waiting = [t for t in runnable if t.deadline is None or t.deadline > now]
        protected = {t.pair for t in waiting if isinstance(t.pair, PairKey)}
        others = [w for w in self.scheduler.workers if w is not self]
        for priority in sorted({t.priority for t in waiting}, reverse=True):
            group = [t for t in waiting if t.priority == priority]
            for t in group:
                if self.residency.holds(t.pair):  # type: ignore[arg-type]
                    return t
            for t in group:
                spec: PairSpec = t.payload.spec
                holders = [w for w in others if w.residency.holds(spec.key)]
                if holders:
                    if any(not h.busy for h in holders):
                        continue  # an idle device already holds it and will take it
                    if sum(1 for u in waiting if u.pair == spec.key) < 2:
                        continue  # its device will get to it soon; a second copy is not worth loading
                else:
                    cost = self.residency.load_cost(spec)
                    if any(
                        not w.busy
                        and w.residency.load_cost(spec) < cost
                        and w.residency.fits(spec, protected - {spec.key})
                        for w in others
                    ):
                        continue  # an idle device can load it more cheaply
                if self.residency.fits(spec, protected - {spec.key}):
                    return t
        return None

    def _load(self, spec: ModelSpec, reuse: Mapping[str, Any]) -> Any:
        self.scheduler.store.acquire(spec.record.canonical)  # a resident model is never evicted from the cache
        try:
            return self.scheduler.loader(
                spec.record, role=spec.role, device=self.device.name, dtype=self.device.dtype, components=dict(reuse)
            )
        except BaseException:
            self.scheduler.store.release(spec.record.canonical)
            raise

    def _unload(self, spec: ModelSpec) -> None:
        self.scheduler.store.release(spec.record.canonical)

    def observe_load(self, report: LoadReport) -> None:
        metrics = self.scheduler.metrics
        if report.loaded_bytes:
            metrics.loads.labels(self.device.name).observe(report.load_s)
        if report.evicted:
            metrics.evictions.labels(self.device.name).observe(report.evict_s)


class _StatusCollector:
    """Gauges read at scrape time from the scheduler itself, so they can never drift from the truth."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        status = self._scheduler.status()
        depth = GaugeMetricFamily("refinery_queue_depth", "Requests waiting for a device", labels=["priority"])
        for priority, count in sorted(status.depth_by_priority.items()):
            depth.add_metric([str(priority)], count)
        resident = GaugeMetricFamily("refinery_resident_bytes", "Model weights resident on a device", labels=["device"])
        running = GaugeMetricFamily("refinery_jobs_running", "Requests running on a device", labels=["device"])
        for device in status.devices:
            resident.add_metric([device.name], device.resident_bytes)
            running.add_metric([device.name], device.jobs_running)
        yield from (depth, resident, running)


def _unique(devices: list[DeviceSpec]) -> list[DeviceSpec]:
    seen: dict[str, DeviceSpec] = {}
    for d in devices:
        seen.setdefault(str(torch.device(d.name)), d)
    return list(seen.values())
