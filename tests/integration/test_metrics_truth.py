"""What the metrics say about a request is what its client got (issue 20, "Operators").

A client that stops reading once it holds its last image (`break` in a Python loop) cancels the call before the
stream's end arrives. That landed 2 or 3 times in 5 between the last image and the end of the stream, and each
such request was counted `CANCELLED` and `failed` although every image had arrived. Here the server's stream
ends only once the server has seen the client go, so the client always closes in that moment, and the request
must still be counted `OK`, `ok`, with its images, and logged `ok`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from modelstore import ModelStore, StoreSettings
from refinery.client import Client, Image
from server.app import RefineryServer
from server.core.domain import Job, JobEvent
from server.core.settings import Settings

from .conftest import TIMEOUT_S, ServerThread, make_settings


class _HeldEnd:
    """The server's scheduler, except that a request's stream ends (its sink's `close(None)`) only once the
    servicer lets the request go (`cancel`: the client went away, or the call is over)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.let_go: dict[str, threading.Event] = {}  # by request id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, job: Job, sink: Any, **kwargs: Any) -> Any:
        self.let_go[job.request_id] = threading.Event()
        return self._engine.submit(job, _HeldSink(sink, self.let_go[job.request_id]), **kwargs)

    def cancel(self, ticket: Any) -> None:
        self.let_go[ticket.job.request_id].set()
        self._engine.cancel(ticket)


class _HeldSink:
    def __init__(self, sink: Any, release: threading.Event) -> None:
        self._sink = sink
        self._release = release

    def emit(self, event: JobEvent) -> None:
        self._sink.emit(event)

    def delivered(self) -> Future[BaseException | None]:
        return self._sink.delivered()  # type: ignore[no-any-return]

    def close(self, error: BaseException | None) -> None:
        if error is None:  # after the last image: hold the stream's end until the client has gone
            assert self._release.wait(TIMEOUT_S), "the servicer never let the request go"
        self._sink.close(error)


class _HeldServer(ServerThread):
    async def _make(self, settings: Settings, server_args: dict[str, Any]) -> RefineryServer:
        server = RefineryServer(settings, **server_args)
        server.scheduler = _HeldEnd(server.scheduler)  # type: ignore[assignment]  # the servicer gets this one
        await server.start()
        return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def held(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[_HeldServer]:
    thread = _HeldServer(make_settings(store_settings, metrics_port=_free_port()), store=model_store)
    try:
        thread.wait_ready()
        yield thread
    finally:
        thread.close()


def _samples(thread: ServerThread) -> dict[str, float]:
    url = f"http://127.0.0.1:{thread.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as r:
        page = r.read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in page.splitlines() if line[:1] not in "#")}


GENERATE_OK = 'refinery_requests_total{code="OK",method="Generate"}'
GENERATE_CANCELLED = 'refinery_requests_total{code="CANCELLED",method="Generate"}'


@pytest.mark.parametrize("number_results", [1, 2])
def test_a_client_that_stops_reading_after_its_last_image_is_counted_ok(
    held: _HeldServer, caplog: pytest.LogCaptureFixture, number_results: int
) -> None:
    before = _samples(held)
    request_id = f"break-after-last-image-{number_results}"
    received: list[Image] = []
    with caplog.at_level(logging.INFO, logger="server"), Client(held.address, resend=None) as client:
        # No name for the iterator: as in a script, `break` drops it, which cancels the call.
        for event in client.generate("a quiet harbour", steps=2, number_results=number_results, request_id=request_id):
            if isinstance(event, Image):
                received.append(event)
                if len(received) == number_results:
                    break  # the natural loop: take the images, stop listening
        assert held.server.scheduler.let_go[request_id].wait(TIMEOUT_S)  # type: ignore[attr-defined]
        # The call is counted where its handler ends, which may be just after the client went: wait for it.
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            after = _samples(held)
            counted = sum(after.get(k, 0) - before.get(k, 0) for k in (GENERATE_OK, GENERATE_CANCELLED))
            if counted >= 1 and f"request {request_id} " in caplog.text:
                break
            assert time.monotonic() < deadline, "the call was never counted"
            time.sleep(0.02)
    assert [image.index for image in received] == list(range(number_results))

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert (delta(GENERATE_OK), delta(GENERATE_CANCELLED)) == (1, 0)
    assert delta('refinery_jobs_total{outcome="ok"}') == 1
    assert delta('refinery_jobs_total{outcome="failed"}') == 0
    assert delta('refinery_jobs_total{outcome="cancelled"}') == 0
    assert delta("refinery_images_total") == number_results
    assert delta('refinery_request_seconds_count{outcome="ok"}') == 1
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"request {request_id} ")]
    assert line.startswith(f"request {request_id} ok:"), line
