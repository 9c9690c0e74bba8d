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

from server.core.domain import ImageResult
from server.generation import Encoder
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
