"""One device's worker: a thread that takes batches from the queue and runs them, and the device's residency.

The route is one way. The scheduler owns the workers and the queue; a worker asks the scheduler for what it
needs only through `WorkerHost` (its next batch, the pairs queued requests wait for, and how to end or deliver
a request) and never reaches into it. Residency changes (loads, evictions, pins) happen only on this thread:
other threads hand them over with `call`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

import torch

from modelstore import Loader
from server.core.errors import WorkerFailed
from server.core.metrics import Metrics
from server.core.settings import Speed
from server.generation import (
    Compiler,
    Encoder,
    PipelinePair,
    PipelineRunner,
    native_size,
    run_pair,
    tune_pipeline,
    tuning_for,
)
from server.scheduling.batch import Batch, BatchHost
from server.scheduling.continuous import ContinuousRun, runs_continuously
from server.scheduling.devices import DeviceSpec, allocated_bytes, is_cuda, memory_releaser
from server.scheduling.leases import Leases
from server.scheduling.pairs import ModelSpec, PairSpec
from server.scheduling.residency import LoadReport, Residency
from server.scheduling.snapshot import DeviceSnapshot
from server.scheduling.ticket import Ticket

log = logging.getLogger(__name__)

R = TypeVar("R")

# How often an idle worker wakes to run control calls and notice it should stop.
TICK_S = 0.25


class WorkerHost(BatchHost, Protocol):
    """What a worker asks of its scheduler: a batch's needs (`BatchHost`: the pairs queued requests wait for,
    ending and delivering requests), its next batch, and a wake-up."""

    def next_batch(self, worker: DeviceWorker, timeout: float) -> list[Ticket]:
        """Requests for this worker to run together ([] after `timeout`; at once when the host has closed,
        by which time it has asked the worker to stop)."""
        ...

    def wake(self) -> None:
        """Make a worker blocked in `next_batch` look again (a control call arrived, or it should stop)."""
        ...

    def take_joiners(self, worker: DeviceWorker, matches: Callable[[Ticket], bool], room: int) -> list[Ticket]:
        """Waiting requests that join this worker's continuous run (`continuous.JoinHost`)."""
        ...


class DeviceWorker:
    """One thread, one device, its residency. The thread is restarted if it ever dies."""

    def __init__(
        self,
        host: WorkerHost,
        device: DeviceSpec,
        *,
        budget_bytes: int,
        loader: Loader,
        leases: Leases,
        run: PipelineRunner,
        encode: Encoder,
        metrics: Metrics,
        speed: Speed,
        max_batch: int,
        batching: str = "static",
    ) -> None:
        self.host = host
        self.device = device
        self.run_pipeline = run
        self.encode = encode
        self.metrics = metrics
        self._loader = loader
        self._leases = leases
        self.residency = Residency(
            device.name,
            budget_bytes,
            half=device.dtype in (torch.float16, torch.bfloat16),
            load=self._load,
            release_memory=memory_releaser(device),
            on_unload=self._unload,
        )
        self.busy_s = 0.0
        self.running: list[Ticket] = []  # the batch on the device, if any
        self.restarts = 0
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._calls_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Raises ValueError for an option this device cannot honour (FP8 without FP8), before anything starts.
        self.tuning = tuning_for(speed, device.name)
        self.compiler = (
            Compiler(device.name, self.tuning.compile_mode, max_images=max_batch, max_sizes=speed.compile_sizes)
            if self.tuning.compile_mode
            else None
        )
        metrics.add_device(device.name, budget_bytes)
        self._max_batch = max_batch
        # Step-level batching needs the real runner's pipelines (a runner tests substitute runs static batches)
        # and eager UNets: compiled graphs are traced for the batch sizes of static batches.
        self._continuous = batching == "continuous" and run is run_pair and self.compiler is None

    # ---- life cycle -------------------------------------------------------------------------------------

    def start(self, *, cpu_threads: int) -> None:
        """Start the thread; on a CPU device it computes with `cpu_threads` intra-op threads."""
        self._thread = threading.Thread(
            target=self._supervise, args=(cpu_threads,), name=f"refinery-{self.device.name}", daemon=True
        )
        self._thread.start()

    def request_stop(self) -> None:
        """Stop taking batches: the thread ends once its running batch (if any) returns."""
        self._stopping.set()
        self.host.wake()

    def join(self, timeout_s: float | None) -> None:
        """Wait up to `timeout_s` for the thread after `request_stop`."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self.compiler is not None:
            # A compile in progress is not interrupted (torch cannot); the thread is a daemon, so it never
            # holds the process up: only the queued shapes are dropped.
            self.compiler.close(0)

    @property
    def busy(self) -> bool:
        """Whether a batch is on the device."""
        return bool(self.running)

    @property
    def accepting(self) -> bool:
        """Whether this worker takes requests now (not while control calls wait or it is stopping)."""
        return not self._calls and not self._stopping.is_set()

    def call(self, fn: Callable[[], R]) -> Future[R]:
        """Run `fn` on this worker's thread between batches (residency changes only happen there)."""
        future: Future[R] = Future()
        with self._calls_lock:
            self._calls.append((fn, future))
        self.host.wake()
        return future

    def pin(self, spec: PairSpec) -> Future[None]:
        """Load `spec` on this device and keep it there (on the worker's thread)."""
        return self.call(functools.partial(self._pin, spec))

    def snapshot(self) -> DeviceSnapshot:
        shapes, calls = self.compiler.snapshot() if self.compiler is not None else ((), {})
        return DeviceSnapshot(
            self.device.name,
            self.residency.budget_bytes,
            self.residency.used_bytes,
            allocated_bytes(self.device),
            tuple(self.residency.resident()),
            len(self.running),
            busy_s=self.busy_s,
            tuning=self.tuning.describe(),
            compiled=shapes,
            unet_calls=calls,
        )

    def observe_load(self, report: LoadReport) -> None:
        if report.loaded_bytes:
            self.metrics.loads.labels(self.device.name).observe(report.load_s)
        if report.evicted:
            self.metrics.evictions.labels(self.device.name).observe(report.evict_s)

    # ---- the thread -------------------------------------------------------------------------------------

    def _supervise(self, cpu_threads: int) -> None:
        if not is_cuda(self.device):
            torch.set_num_threads(cpu_threads)  # a per-thread setting: see devices.cpu_threads
        while not self._stopping.is_set():
            try:
                self._loop()
            except BaseException as exc:  # a bug outside any one batch: never leave requests hanging
                self.restarts += 1
                log.critical("device worker %s died; restarting it", self.device.name, exc_info=exc)
                failed = WorkerFailed(f"the worker for {self.device.name} failed; retry the request")
                for ticket in self.running:
                    self.host.finish(ticket, failed)
                self.running = []
                time.sleep(0.1)  # do not spin if the failure repeats at once

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._run_calls()
            tickets = self.host.next_batch(self, TICK_S)
            if not tickets:
                continue
            # Cleared only when the batch returns: if the thread dies inside it, _supervise still knows
            # which requests to end.
            self.running = tickets
            started = time.perf_counter()
            with self._using_device():
                self._run_for(tickets).run()
            # Time with a batch on the device: against wall time, how much the device idled between batches.
            self.busy_s += time.perf_counter() - started
            self.running = []

    def _run_for(self, tickets: list[Ticket]) -> Batch | ContinuousRun:
        if self._continuous and runs_continuously(tickets):
            return ContinuousRun(self, tickets, max_images=self._max_batch)
        return Batch(self, tickets)

    def _using_device(self) -> contextlib.AbstractContextManager[Any]:
        """Held while this thread uses the device: the compiler runs its graphs' first passes only between."""
        return self.compiler.device_lock if self.compiler is not None else contextlib.nullcontext()

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _pin(self, spec: PairSpec) -> None:
        with self._using_device():
            pair, report = self.residency.acquire(spec, self.host.waiting_pairs(), pin=True)
        self.residency.release(spec.key)
        self.observe_load(report)
        self._compile_native(pair)

    def _compile_native(self, pair: PipelinePair) -> None:
        """Queue the pair's UNets at the base's native size (every batch up to --max-batch) for compiling."""
        if self.compiler is None:
            return
        width, height = native_size(pair.base)
        for pipe in (pair.base, pair.refiner):
            if pipe is not None:
                self.compiler.request_size(pipe.unet, width, height)

    def _load(self, spec: ModelSpec, reuse: Mapping[str, Any]) -> Any:
        self._leases.acquire(spec.record.air)  # a resident model is never evicted from the cache
        try:
            pipe = self._loader(
                spec.record, role=spec.role, device=self.device.name, dtype=self.device.dtype, components=dict(reuse)
            )
            if not self.tuning.untuned:
                tune_pipeline(pipe, self.tuning, compiler=self.compiler, model=spec.record.canonical, role=spec.role)
            return pipe
        except BaseException:
            self._leases.release(spec.record.air)
            raise

    def _unload(self, spec: ModelSpec) -> None:
        self._leases.release(spec.record.air)
