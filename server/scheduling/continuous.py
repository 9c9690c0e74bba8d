"""Step-level batching on a device (issue 19, `--batching continuous`): a request never waits for a running batch.

A run starts like a batch (the scheduler's next requests for this device, one pair) and then, at every step
boundary, on the worker's thread:

1. **Leave**: a request cancelled, or past its deadline, is ended and its lanes dropped; the others go on.
2. **Step**: every active lane takes one step (`server/generation/stepper.py`: one UNet call per stage).
3. **Deliver**: requests whose images are decoded are handed to the encoder threads, as a batch's are.
4. **Join**: waiting requests that can share the run's UNet calls (the same pair and LoRAs, image size and text
   windows: `stepper.join_key`; text-to-image) join, while the run has room: at most `max_batch` images in
   flight (what a static batch may hold: the device's memory bound).

Policy (fair and bounded): joiners come from the head of the queue in its own order (priority, then arrival).
The run takes the first waiting requests only while they are ones it can run and fit its room; at the first
that does not (another pair, another size, too many images for the room left), it takes nothing more, so no
later request ever overtakes it: a large request waits for room rather than being starved by a stream of small
ones, and a request for another pair gets the device as soon as the run drains (it stops joining, and ends
when its last request does). The run ends when it has no request left.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

from modelstore.errors import ModelStoreError
from server.core.domain import ImageMode, LoadPhase, ModelLoading, PairKey, Progress
from server.core.errors import DeadlineExceeded, OutOfDeviceMemory, ServerError
from server.generation import PipelinePair, RunResult, Stepper, StepState, join_key, native_size
from server.scheduling.batch import BatchDevice, BatchHost, preview_events
from server.scheduling.delivery import results_delivery
from server.scheduling.pace import shape_of
from server.scheduling.pairs import ModelSpec
from server.scheduling.ticket import Ticket

log = logging.getLogger(__name__)


class JoinDevice(BatchDevice, Protocol):
    """What a continuous run uses of its worker: a batch's needs, and its host's joins."""

    @property
    def host(self) -> JoinHost: ...


class JoinHost(BatchHost, Protocol):
    def take_joiners(self, worker: Any, matches: Callable[[Ticket], bool], room: int) -> list[Ticket]:
        """The waiting requests at the head of the queue, in order, while each `matches` and their images fit
        `room` (none once one does not); removed from the queue."""
        ...


def runs_continuously(tickets: list[Ticket]) -> bool:
    """Whether these requests may run step by step (requests from an image run in static batches)."""
    return all(t.job.mode is ImageMode.TEXT for t in tickets)


class ContinuousRun:
    """One pair on one device, stepped until no request is left. `run()` once."""

    def __init__(self, worker: JoinDevice, tickets: list[Ticket], *, max_images: int) -> None:
        self._worker = worker
        self._host = worker.host
        self._first = tickets
        self._max_images = max_images
        self._active: dict[Hashable, Ticket] = {}
        self._key: Hashable = None

    def run(self) -> None:
        spec = self._first[0].spec
        assert spec is not None, "only resolved requests reach a device"
        acquired = False
        try:
            self._start(self._first, now=time.perf_counter())
            pair = dataclasses.replace(self._acquire(spec.key), loras=self._first[0].loras)
            acquired = True
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="refinery-decode") as decoder:
                self._loop(Stepper(pair, decoder), pair, spec.key)
        except torch.OutOfMemoryError:
            # No retry here (a static batch retries once after evicting idle pairs): the run's requests end with
            # RESOURCE_EXHAUSTED, and the idle pairs are evicted so that a resend finds the room.
            evicted = self._worker.residency.evict_idle()
            log.warning("out of memory on %s in a continuous run; evicted %d idle pair(s)", self._worker.device.name,
                        len(evicted))  # fmt: skip
            error = OutOfDeviceMemory(
                f"{self._max_images} image(s) in flight do not fit on {self._worker.device.name}; retry, or lower "
                "--max-batch"
            )
            for ticket in self._active.values():
                self._host.finish(ticket, error)
            self._active = {}
        except Exception as exc:
            if not isinstance(exc, (ServerError, ModelStoreError)):
                log.error("continuous run on %s failed unexpectedly", self._worker.device.name, exc_info=exc)
            for ticket in self._active.values():
                self._host.finish(ticket, exc)
            self._active = {}
        finally:
            if acquired:
                self._worker.residency.release(spec.key)

    def _loop(self, stepper: Stepper, pair: PipelinePair, pair_key: PairKey) -> None:
        width, height = native_size(pair.base)
        first = self._first[0].job
        self._key = (
            pair_key,
            self._first[0].loras,
            join_key(first.shape(first.width or width, first.height or height)),
        )
        for ticket in self._first:
            self._admit(stepper, ticket, width, height)
        while stepper:
            self._leave(stepper)
            if stepper.images:
                # Images denoised together: a tick's, as a static batch's (lanes between stages count once).
                self._worker.metrics.batch_images.observe(stepper.images)
                for stage, seconds in stepper.tick().items():
                    self._worker.metrics.step_time.labels(stage.value).observe(seconds)
            for finished in stepper.collect(wait=not stepper.images):
                self._deliver(finished.key, finished.result)
            self._join(stepper, pair_key, width, height)

    def _acquire(self, key: PairKey) -> PipelinePair:
        spec = self._first[0].spec
        assert spec is not None

        def on_load(model: ModelSpec, done: bool) -> None:
            event = ModelLoading(model.record.air, model.role, LoadPhase.READY if done else LoadPhase.LOADING)
            for ticket in self._first:
                ticket.sink.emit(event)

        pair, report = self._worker.residency.acquire(spec, self._host.waiting_pairs() - {key}, on_load=on_load)
        self._worker.observe_load(report)
        return pair

    def _start(self, tickets: list[Ticket], now: float) -> None:
        for ticket in tickets:
            ticket.timings.started = now
            ticket.batch, ticket.batch_offset = (ticket,), 0  # its results are its own in the run's lanes
            self._worker.metrics.queue_wait.observe(now - ticket.timings.submitted)
            self._active[id(ticket)] = ticket

    def _admit(self, stepper: Stepper, ticket: Ticket, width: int, height: int) -> None:
        job = ticket.job
        shape = job.shape(job.width or width, job.height or height)
        ticket.timings.loading_s = time.perf_counter() - ticket.timings.started
        ticket.timings.run_started = time.perf_counter()
        stepper.admit(id(ticket), shape, job.samples(), _Reporter(self._worker, ticket))

    def _matches(self, width: int, height: int, pair_key: PairKey) -> Callable[[Ticket], bool]:
        def matches(ticket: Ticket) -> bool:
            job = ticket.job
            if ticket.spec is None or ticket.spec.key != pair_key or not runs_continuously([ticket]):
                return False
            shape = job.shape(job.width or width, job.height or height)
            return (pair_key, ticket.loras, join_key(shape)) == self._key

        return matches

    def _join(self, stepper: Stepper, pair_key: PairKey, width: int, height: int) -> None:
        room = self._max_images - stepper.images
        if room <= 0:
            return
        joiners = self._host.take_joiners(self._worker, self._matches(width, height, pair_key), room)
        self._start(joiners, now=time.perf_counter())
        for ticket in joiners:
            self._admit(stepper, ticket, width, height)

    def _leave(self, stepper: Stepper) -> None:
        now = time.monotonic()
        for key, ticket in list(self._active.items()):
            error = ticket.cancel_error if ticket.cancel_requested else None
            if error is None and ticket.deadline is not None and ticket.deadline <= now:
                error = DeadlineExceeded("the deadline passed while the request was running")
            if error is not None:
                stepper.drop(key)
                del self._active[key]
                self._host.finish(ticket, error)

    def _deliver(self, key: Hashable, result: RunResult) -> None:
        ticket = self._active.pop(key, None)
        if ticket is None:  # ended meanwhile
            return
        job = ticket.job
        ended = time.perf_counter()
        ticket.timings.run_ended = ended
        ticket.timings.run = result.timings
        width, height = result.images[0].size if result.images else (job.width, job.height)
        shape = job.shape(job.width or width, job.height or height)
        self._host.observe_pace(shape_of(job, shape.width, shape.height), ended - ticket.timings.run_started, None)
        delivery = results_delivery(
            ticket, shape, job.samples(), result, encode=self._worker.encode, finish=self._host.finish
        )
        for task in delivery.tasks():
            self._host.deliver(task)


class _Reporter:
    """One request's `StepObserver` in a run: its progress, its previews, its first-step metric."""

    def __init__(self, worker: BatchDevice, ticket: Ticket) -> None:
        self._worker, self._ticket = worker, ticket
        self._last = ticket.timings.run_started

    def on_step(self, state: StepState) -> None:
        ticket, now = self._ticket, time.perf_counter()
        if ticket.steps_done == 0:
            self._worker.metrics.first_step.observe(now - ticket.timings.submitted)
        ticket.steps_done = state.overall_step
        stepped = ticket.timings.stepped  # a step's share of the device is the run's, shared with its others
        stepped[state.stage.value] = stepped.get(state.stage.value, 0.0) + now - self._last
        self._last = now
        ticket.sink.emit(
            Progress(
                stage=state.stage,
                step=state.step,
                stage_steps=state.stage_steps,
                overall_step=state.overall_step,
                total_steps=state.total_steps,
                elapsed_s=now - ticket.timings.run_started,
                image_indices=tuple(range(ticket.job.number_results)),
                branch=state.branch,
            )
        )
        every = ticket.job.preview_every
        if every and state.overall_step % every == 0:
            for event in preview_events(ticket, state, state.normalized_latents()):
                ticket.sink.emit(event)
