"""Events cross from the worker thread to an RPC's event loop through an unbounded asyncio queue.

Unbounded on purpose: the worker hands an event over in microseconds and never waits for the client, so a
slow reader cannot stall the device. What piles up is bounded by one request (a few hundred small progress
messages, its previews and its images).

`Channel` is that crossing for any thread and item type; ModelService's pulls and verifications use it too.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.api.boundary import Logged
from server.core.domain import ImageResult, Job, JobEvent

T = TypeVar("T")


@dataclass(frozen=True)
class _End:
    error: BaseException | None


class Channel(Generic[T]):
    """Items from a thread to the event loop that created the channel: `put` them and `close` on the thread;
    iterate on the loop. Iteration ends after `close(None)`, or raises the error `close` was given."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[T | _End] = asyncio.Queue()
        self._ended = False

    def put(self, item: T) -> None:
        self._send(item)

    def close(self, error: BaseException | None) -> None:
        self._send(_End(error))

    def _send(self, item: T | _End) -> None:
        # RuntimeError: the loop is closed; the RPC, and whoever would have read this, is long gone.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, _End):
            self._ended = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item


class AsyncEventStream:
    """An `EventSink` for the worker thread and an async iterator of the same events for the event loop.

    Iteration ends after the request's last event, or raises `Logged(error)` with the error it ended with (the
    scheduler has logged it in the request's own line). Create it on the loop that will read it.
    """

    def __init__(self) -> None:
        self._events: Channel[JobEvent] = Channel()
        self._delivered: Future[BaseException | None] = Future()
        self._images_sent = 0

    # ---- the worker thread's side --------------------------------------------------------------------

    def emit(self, event: JobEvent) -> None:
        self._events.put(event)

    def close(self, error: BaseException | None) -> None:
        self._events.close(Logged(error) if error is not None else None)

    def delivered(self) -> Future[BaseException | None]:
        return self._delivered

    # ---- the event loop's side -----------------------------------------------------------------------

    def settle(self, error: BaseException | None) -> None:
        """Say whether every event reached the client (None) or not; the first word counts."""
        with contextlib.suppress(InvalidStateError):
            self._delivered.set_result(error)

    def sent(self, event: JobEvent, job: Job) -> bool:
        """Note that every message of `event` was handed to the client. True when it was the last image `job`
        asked for (a compare's base-only images included): the request is delivered, and `ok`, whatever its
        client does next. A client that stops reading once it holds its last image cancels the call before the
        stream's end arrives; that is no failure (issue 20: such requests were counted failed)."""
        if not isinstance(event, ImageResult):
            return False
        self._images_sent += 1
        if self._images_sent < job.number_results * (2 if job.compare else 1):
            return False
        self.settle(None)
        return True

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> JobEvent:
        return await self._events.__anext__()
