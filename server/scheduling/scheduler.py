"""The device scheduler: admission, resolution, placement and batching in front of one worker per device.

A request's life here (the API calls only `submit` and `cancel`):

1. **Admission.** `submit` puts it in the bounded priority queue (`queue.py`) at once, or refuses it with
   RESOURCE_EXHAUSTED + RetryInfo when the queue is full. Nothing waits unboundedly.
2. **Resolution** (`resolver.py`). While it waits, a resolver thread leases its models in the cache, resolves
   them (downloading if needed), checks their roles and measures them. Until then it is *blocked*: no device
   takes it. A model that is unknown, of the wrong architecture, or too large for every device ends the
   request here, before it costs a device anything.
3. **Placement** (`placement.py`): affinity to a device that holds the pair, then no thrash, then the cheapest
   load.
4. **Batching.** With it come up to `max_batch` images of requests with the same pair and the same shape (size,
   steps, split, sampler, guidance); each keeps its own prompt, seed and generator, so each image equals the
   one it would get alone, up to float rounding between batch sizes.
5. **Execution** on the device's worker thread (`worker.py`, `batch.py`). A cancelled request leaves the queue,
   or stops receiving events at the next step; its batch mates go on, and the run stops once none is left.
6. **Delivery.** Finished images are encoded and sent on the encoder threads (`encode_threads`), each image
   its own task and all sent in order (`delivery.py`), while the worker already takes its next batch: the
   device does not wait for PNG compression.

Faults: running out of device memory evicts every idle pair and retries once, then ends the batch with
RESOURCE_EXHAUSTED; a failing batch never kills its worker; a worker thread that dies anyway is restarted and
the requests it held end with UNAVAILABLE.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from modelstore import DownloadCause, Loader, ModelStore, load_pipeline
from modelstore.errors import ModelStoreError
from server.core.domain import Job, PairKey, Queued
from server.core.errors import DeadlineExceeded, ServerError, ShuttingDown
from server.core.logs import escaped
from server.core.metrics import Metrics
from server.core.settings import Settings
from server.generation import Encoder, PipelineRunner, configure_cache, encode_image, run_pair
from server.scheduling import placement
from server.scheduling.admission import Admission
from server.scheduling.devices import cpu_threads, device_budget, is_cuda, resolve_devices
from server.scheduling.gauges import SnapshotGauges
from server.scheduling.leases import LeaseSet
from server.scheduling.pace import Pace, Shape
from server.scheduling.pinning import pin_everywhere
from server.scheduling.queue import AdmissionQueue, Runnable, Waiting
from server.scheduling.resolver import Resolver
from server.scheduling.snapshot import SchedulerSnapshot
from server.scheduling.ticket import ConfirmingSink, EventSink, RequestTrace, Ticket, log_outcome, outcome_of
from server.scheduling.worker import TICK_S, DeviceWorker

log = logging.getLogger(__name__)


# A call cancelled this close to its deadline was cancelled by it (the client's timer and the server's fire at
# about the same moment, in either order).
_DEADLINE_SLACK_S = 0.05


def batch_key(job: Job) -> Hashable:
    """Requests with equal keys can be denoised together (prompts, seeds and result counts may differ): the
    same pair and `RenderShape` (size, steps, split, guidance, sampler, compare, aesthetic scores, each stage's
    LoRAs with their weights, prompt windows). Compare requests therefore batch only with each other: in one base
    call every image runs the same steps, so a plain request would pay for, and wait on, base steps whose image it
    throws away."""
    return (job.pair, job.shape(job.width, job.height))


class Scheduler:
    """`start()` once, `close()` at the end."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        *,
        loader: Loader = load_pipeline,
        run: PipelineRunner = run_pair,
        encode: Encoder | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        if encode is None:  # the real encoder at the configured PNG level (tests pass stand-ins)
            encode = functools.partial(encode_image, png_level=settings.speed.png_level)
        self.queue: AdmissionQueue[Ticket] = AdmissionQueue(settings.max_queue, group=placement.group)
        self._resolver = Resolver(store)
        self._pace = Pace()  # how fast a device gets through work: to refuse what cannot meet its deadline
        self._lock = threading.Lock()
        self._tickets: set[Ticket] = set()  # every request not yet ended
        self._closed = False
        self._stopping = threading.Event()
        self._resolving = ThreadPoolExecutor(max_workers=4, thread_name_prefix="refinery-resolve")
        self._encoders = (
            ThreadPoolExecutor(max_workers=settings.encode_threads, thread_name_prefix="refinery-encode")
            if settings.encode_threads
            else None
        )
        self.workers = [
            DeviceWorker(
                self,
                device,
                budget_bytes=device_budget(
                    device, budget_bytes=settings.budget_bytes, headroom_fraction=settings.headroom_fraction
                ),
                loader=loader,
                leases=store,
                run=run,
                encode=encode,
                metrics=self.metrics,
                speed=settings.speed,
                max_batch=settings.max_batch,
                batching=settings.batching,
            )
            for device in resolve_devices(settings.devices)
        ]
        if any(w.compiler is not None for w in self.workers):
            speed = settings.speed
            configure_cache(speed.compile_cache_dir or settings.store.cache_dir / "compile")
        self.metrics.watch(SnapshotGauges(self.snapshot))
        # Megapixel-steps one request may ask for (server.core.settings.WORK_LIMITS).
        self.work_limit = settings.limits.work_limit({"cuda" if is_cuda(w.device) else "cpu" for w in self.workers})
        self._admission = Admission(self.workers, self._pace, self.work_limit)

    # ---- the API's side ---------------------------------------------------------------------------------

    def submit(
        self, job: Job, sink: EventSink, *, deadline: float | None = None, trace: RequestTrace | None = None
    ) -> Ticket:
        """Admit `job`; its events go to `sink`. `deadline` (time.monotonic()) is when the client stops
        waiting; `trace` is ended with the request. Raises ShuttingDown while draining, Overloaded when the
        queue is full."""
        ticket = Ticket(job, sink, leases=LeaseSet(self.store), deadline=deadline, trace=trace)
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            self._tickets.add(ticket)
        try:
            self.queue.submit(
                ticket,
                priority=job.priority,
                batch_key=batch_key(job),
                pair=job.pair,
                deadline=deadline,
                on_position=lambda position, depth: self._announce(ticket, position, depth),
                blocked=True,
            )
        except Exception:
            with self._lock:
                self._tickets.discard(ticket)
            self.metrics.jobs.labels("rejected").inc()
            raise
        self._resolving.submit(self._resolve, ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop `ticket`: dropped if still queued, stopped at its next step if running; a no-op once ended. A
        client that gives up at its deadline ends its request as DEADLINE_EXCEEDED, not cancelled."""
        late = ticket.deadline is not None and time.monotonic() >= ticket.deadline - _DEADLINE_SLACK_S
        ticket.request_cancel(DeadlineExceeded("the deadline passed") if late else None)
        if self.queue.cancel(ticket):
            self.finish(ticket, ticket.cancel_error)  # never started; a running one stops at its next step

    # ---- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        threads = cpu_threads()
        if any(not is_cuda(w.device) for w in self.workers):
            log.info("using %d CPU thread(s) per CPU worker, leaving a core for serving", threads)
        for worker in self.workers:
            worker.start(cpu_threads=threads)
        threading.Thread(target=self._reap, name="refinery-deadlines", daemon=True).start()

    def pin(self, pairs: Sequence[PairKey]) -> Future[None]:
        """Load each pair on every device and keep it there (`--pin`, PinPair); the future completes once all
        are resident, or fails with the first error, leaving none of them newly pinned (a pair that cannot fit
        beside those already pinned is refused before anything loads)."""
        done: Future[None] = Future()
        pinned_before = {p.key for w in self.workers for p in w.residency.resident() if p.pinned}
        pin = functools.partial(
            pin_everywhere,
            pairs,
            pinned_before,
            store=self.store,
            resolver=self._resolver,
            admission=self._admission,
            workers=self.workers,
            unpin=self.unpin,
            done=done,
        )
        threading.Thread(target=pin, name="refinery-pin", daemon=True).start()
        return done

    def unpin(self, key: PairKey) -> bool:
        """Let `key` be evicted again on every device; whether any device held it pinned."""
        return any([w.residency.unpin(key) for w in self.workers])  # a list: unpin on every device

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new work, end queued requests with UNAVAILABLE, stop running ones at their next step, and
        wait up to `timeout_s` for the workers."""
        with self._lock:
            self._closed = True
            tickets = list(self._tickets)
        stopping = ShuttingDown("the server is shutting down; retry on another replica")
        for ticket in tickets:
            ticket.request_cancel(stopping)
        # Every worker is told before the queue closes (a closed queue answers `take` at once, so a worker not
        # yet told would poll it in a loop), then all are waited for against one deadline.
        for worker in self.workers:
            worker.request_stop()
        for ticket in self.queue.close():
            self.finish(ticket, stopping)
        self._stopping.set()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for worker in self.workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._resolving.shutdown(wait=False, cancel_futures=True)
        if self._encoders is not None:
            self._encoders.shutdown(wait=True)  # finished images still get sent: each takes well under a second

    # ---- views ------------------------------------------------------------------------------------------

    def snapshot(self) -> SchedulerSnapshot:
        devices = tuple(w.snapshot() for w in self.workers)
        return SchedulerSnapshot(devices, self.queue.depth(), self.queue.max_queue, self.queue.depth_by_priority())

    def resident_models(self) -> set[str]:
        resident = (pair.key for w in self.workers for pair in w.residency.resident())
        return {model.canonical for key in resident for _, model in key.roles()}

    # ---- the workers' side (`WorkerHost`) ---------------------------------------------------------------

    def next_batch(self, worker: DeviceWorker, timeout: float) -> list[Ticket]:
        peers = [w for w in self.workers if w is not worker]

        def choose(runnable: Runnable[Ticket]) -> Waiting[Ticket] | None:
            if not worker.accepting:
                return None  # control calls (pins) go first; take() is retried after the tick
            return placement.choose(worker, peers, runnable, time.monotonic())

        return self.queue.take(
            choose, max_batch=self.settings.max_batch, weight=lambda t: t.job.number_results, timeout=timeout
        )

    def take_joiners(self, worker: DeviceWorker, matches: Callable[[Ticket], bool], room: int) -> list[Ticket]:
        """Requests that join `worker`'s continuous run: none while it has control calls (pins) waiting, so the
        run drains and they go first, as `next_batch` lets them."""
        if not worker.accepting:
            return []
        return self.queue.take_joiners(matches, room, weight=lambda t: t.job.number_results)

    def waiting_pairs(self) -> set[PairKey]:
        return {pair for pair in self.queue.waiting_pairs() if isinstance(pair, PairKey)}

    def deliver(self, send: Callable[[], None]) -> None:
        """Run `send` on an encoder thread, so the device worker goes on to its next batch meanwhile; on the
        caller's thread when `encode_threads` is 0. Raises RuntimeError once the scheduler is closed."""
        if self._encoders is None:
            send()
        else:
            self._encoders.submit(send)

    def finish(self, ticket: Ticket, error: BaseException | None) -> None:
        """End a request exactly once: count and log its outcome, close its stream, release its models."""
        with self._lock:
            if ticket not in self._tickets:
                return
            self._tickets.discard(ticket)
        ticket.leases.release_all()
        if error is None and isinstance(ticket.sink, ConfirmingSink):
            # Its outcome is known once the client has taken the images, or has not.
            ticket.sink.delivered().add_done_callback(lambda done: self._record(ticket, done.result()))
        else:
            self._record(ticket, error)
        ticket.sink.close(error)

    def _record(self, ticket: Ticket, error: BaseException | None) -> None:
        """Count and log a request's outcome (before its client sees the stream end)."""
        outcome = outcome_of(error)
        self.metrics.jobs.labels(outcome).inc()
        self.metrics.modes.labels(ticket.job.mode.value, _stages(ticket.job)).inc()
        self.metrics.request_time.labels(outcome).observe(time.perf_counter() - ticket.timings.submitted)
        if error is None:
            self.metrics.images.inc(ticket.job.number_results * (2 if ticket.job.compare else 1))
        log_outcome(ticket, error, outcome)
        if ticket.trace is not None:
            ticket.trace.end(ticket, outcome, error)

    def wake(self) -> None:
        self.queue.notify()

    def observe_pace(self, shape: Shape, seconds: float, step_seconds: float | None) -> None:
        self._pace.observe(shape, seconds, step_seconds)

    # ---- internals --------------------------------------------------------------------------------------

    def _reap(self) -> None:
        """End queued requests whose deadline passed, even while every device is busy."""
        while not self._stopping.wait(TICK_S):
            for ticket in self.queue.expire():
                self.finish(ticket, DeadlineExceeded("the deadline passed while the request was queued"))

    def _announce(self, ticket: Ticket, position: int, depth: int) -> None:
        if not ticket.cancel_requested:
            ticket.sink.emit(Queued(position=position, queue_depth=depth))

    def _resolve(self, ticket: Ticket) -> None:
        """On a resolver thread: make the request's models available and check they can run somewhere."""
        ticket.timings.resolving = time.perf_counter()
        try:
            cause = DownloadCause.request(escaped(ticket.job.request_id))  # a client's text, bound for the log
            spec = self._resolver.pair_spec(
                ticket.job.pair, ticket.leases, cause=cause, sink=ticket.sink, give_up=ticket.cancel_signal
            )
            loras = self._resolver.loras(
                ticket.job, spec, ticket.leases, cause=cause, sink=ticket.sink, give_up=ticket.cancel_signal
            )
            with self._lock:
                others = list(self._tickets)
            shape = self._admission.admit(ticket, spec, others)
        except BaseException as exc:
            if not isinstance(exc, (ModelStoreError, ServerError)):
                log.error("resolving request %s failed", ticket.job.request_id, exc_info=exc)
            if self.queue.cancel(ticket):
                self.finish(ticket, exc)
            return
        ticket.timings.resolved = time.perf_counter()
        ticket.shape = shape  # before `spec`: a ticket with a spec has its shape
        ticket.loras = loras
        ticket.spec = spec
        self.queue.unblock(ticket)


def _stages(job: Job) -> str:
    """The stages a request runs, as the mode metric labels them."""
    if job.refiner is None:
        return "base"
    return "base+refiner" if job.base_steps_run else "refiner"
