"""What the metrics say is what happened (issue 20, "Operators").

Every series the dashboard (deploy/grafana/refinery.json) and the alerts (deploy/prometheus/refinery-alerts.yml)
read exists on a fresh server before any request, at zero, for its device; GPU series are absent on a CPU.

A client that stops reading once it holds its last image (`break` in a Python loop) cancels the call before the
stream's end arrives. That landed 2 or 3 times in 5 between the last image and the end of the stream, and each
such request was counted `CANCELLED` and `failed` although every image had arrived. Here the server's stream
ends only once the server has seen the client go, so the client always closes in that moment, and the request
must still be counted `OK`, `ok`, with its images, and logged `ok`.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelstore import ModelStore, StoreSettings
from refinery.client import Client, Image
from server.app import RefineryServer
from server.core.domain import Job, JobEvent
from server.core.settings import Settings

from .conftest import TIMEOUT_S, ServerThread, make_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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
            logged = f"request {request_id} " in caplog.text  # logged after it is counted: read first
            after = _samples(held)
            counted = sum(after.get(k, 0) - before.get(k, 0) for k in (GENERATE_OK, GENERATE_CANCELLED))
            if counted >= 1 and logged:
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


def _queries() -> list[str]:
    """Every PromQL expression of the dashboard (panels and variables) and of the alert rules."""
    dashboard = json.loads((DEPLOY / "grafana" / "refinery.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "refinery-alerts.yml").read_text())
    exprs += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    return exprs


@pytest.fixture
def fresh(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    """A server as a replica of the fleet starts (`--pin none`): nothing loaded, no request yet."""
    thread = ServerThread(make_settings(store_settings, metrics_port=_free_port(), pins=()), store=model_store)
    try:
        thread.wait_ready()
        yield thread
    finally:
        thread.close()


def test_every_series_the_dashboard_and_alerts_read_exists_before_any_request(fresh: ServerThread) -> None:
    names = {m for expr in _queries() for m in re.findall(r"\brefinery_[a-z0-9_]+", expr)}
    gpu = {name for name in names if name.startswith("refinery_gpu_")}
    assert gpu and "refinery_jobs_total" in names and "refinery_eviction_seconds_bucket" in names  # parsed
    samples = _samples(fresh)
    series = {name: [k for k in samples if k == name or k.startswith(name + "{")] for name in names}
    assert [name for name in sorted(names - gpu) if not series[name]] == []
    # Per device, at zero until the first event: rate() sees a replica's first load and eviction.
    for name in ("refinery_model_load_seconds_count", "refinery_eviction_seconds_count"):
        assert samples[name + '{device="cpu"}'] == 0
    assert samples['refinery_jobs_total{outcome="ok"}'] == 0
    assert samples['refinery_budget_bytes{device="cpu"}'] > 0
    assert samples['refinery_step_seconds_count{stage="refiner"}'] == 0
    # The GPU series are for GPUs: a CPU server has none (no NVML or CUDA asked either).
    assert [k for k in samples if k.startswith("refinery_gpu_")] == []
