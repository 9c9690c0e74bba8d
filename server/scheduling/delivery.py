"""Sending one request's finished images: each image encoded as its own task on the encoder threads, all sent
in index order, the request ended after the last.

A batch of four images used to be encoded one after another on one thread, four PNGs on the request's critical
path; Pillow compresses with the GIL released, so the encoder threads now take the images of a batch at once
(benchmarks/bench_encode.py). Whichever task finishes an image sends every image that is ready in order, so a
fast encode of image 2 waits for image 1 without holding a thread.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from PIL import Image

from server.core.domain import Branch, ImageResult, RenderShape, Sample, Stage
from server.generation import Encoder, RunResult
from server.scheduling.ticket import Ticket

log = logging.getLogger(__name__)

# One image to send, and how its event is made from its encoded bytes.
Item = tuple[Image.Image, Callable[[bytes], ImageResult]]


class Delivery:
    """One request's images. `tasks()` once; run each task once, on any thread, in any order."""

    def __init__(
        self,
        ticket: Ticket,
        items: list[Item],
        *,
        encode: Encoder,
        finish: Callable[[Ticket, BaseException | None], None],
    ) -> None:
        self._ticket = ticket
        self._items = items  # in the order they are sent
        self._encode = encode
        self._finish = finish
        self._lock = threading.Lock()
        self._encoded: dict[int, bytes] = {}
        self._next = 0  # the index of the next image to send
        self._failed = False
        self._started = 0.0

    def tasks(self) -> list[Callable[[], None]]:
        return [functools.partial(self._run, index) for index in range(len(self._items))]

    def _run(self, index: int) -> None:
        with self._lock:
            if self._failed:
                return
            if not self._started:
                self._started = self._ticket.timings.delivering = time.perf_counter()
        job = self._ticket.job
        try:
            data = self._encode(self._items[index][0], job.output_format)
            with self._lock:
                self._encoded[index] = data
                self._send_ready()
                done = self._next == len(self._items)
        except Exception as exc:
            log.error("sending the images of request %s failed", job.request_id, exc_info=exc)
            with self._lock:
                self._failed = True
            self._finish(self._ticket, exc)
            return
        if done:
            self._ticket.timings.encode_s = time.perf_counter() - self._started
            self._finish(self._ticket, None)

    def _send_ready(self) -> None:
        """Under the lock: send every encoded image that is next in order."""
        while self._next in self._encoded:
            make_event = self._items[self._next][1]
            self._ticket.sink.emit(make_event(self._encoded.pop(self._next)))
            self._next += 1


def results_delivery(
    ticket: Ticket,
    shape: RenderShape,
    samples: list[Sample],
    result: RunResult,
    *,
    encode: Encoder,
    finish: Callable[[Ticket, BaseException | None], None],
) -> Delivery:
    """Encode and send one request's images (each its own task, sent in order), then end it. With compare,
    every base-only image first, then the refined ones: a client that ignores `branch` and keeps the last
    image per index keeps the refined one."""
    job = ticket.job
    offset = ticket.batch_offset
    refiner_model = job.refiner.model.canonical if job.refiner is not None else ""
    branches = [(result.images, Branch.MAIN, shape.base_steps_run, shape.refiner_steps, refiner_model)]
    if result.base_only:  # the base alone runs every step that runs
        branches.insert(0, (result.base_only, Branch.BASE_ONLY, shape.steps_run, 0, ""))

    def item(
        images: list[Image.Image], branch: Branch, base_steps: int, refiner_steps: int, refiner: str, index: int
    ) -> Item:
        image = images[offset + index]
        tokens = result.tokens[offset + index] if result.tokens else ()
        if branch is Branch.BASE_ONLY:  # the base's image alone: nothing of the refiner's made it
            tokens = tuple(t for t in tokens if t.stage is Stage.BASE)
        return image, lambda data: ImageResult(
            data=data,
            mime_type=job.output_format.mime_type,
            seed=samples[offset + index].seed,
            index=index,
            width=image.width,
            height=image.height,
            base_steps=base_steps,
            refiner_steps=refiner_steps,
            model=job.model.canonical,
            refiner_model=refiner,
            branch=branch,
            loras=shape.loras,
            refiner_loras=shape.refiner_loras if refiner else (),
            tokens=tokens,
            mode=shape.mode,
            first_step=shape.start_index + 1,
        )

    items = [item(*branch, index) for branch in branches for index in range(job.number_results)]
    return Delivery(ticket, items, encode=encode, finish=finish)
