"""Issue 21, item 10: what a noisy client costs the server stays bounded. Idle connections to the metrics port
do not each hold a thread (2,000 held 2,017) and cannot lock the scraper out; garbage sent to health or
reflection is INVALID_ARGUMENT without a traceback in the log; refused calls log one line per reason per
interval, with the count of those not logged."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from modelstore import ModelStore, StoreSettings
from server.api import access
from server.core.settings import Security
from tests.integration.conftest import ServerThread, make_settings

from .conftest import TIMEOUT_S, TOKEN
from .test_access import GENERATION, UNAUTHENTICATED, bearer, code_of

IDLE_CONNECTIONS = 400


@pytest.fixture(scope="module")
def noisy(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    """A server with a generation token, a metrics port and a health-only port."""
    settings = make_settings(
        store_settings, pins=(), metrics_port=_free_port(), health_port=_free_port(), security=Security(token=TOKEN)
    )
    thread = ServerThread(settings, store=model_store)
    try:
        yield thread
    finally:
        thread.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as response:
        assert b"refinery_requests_total" in response.read()
        return int(response.status)


def test_idle_connections_to_the_metrics_port_hold_no_thread_each(noisy: ServerThread) -> None:
    port = noisy.server.metrics_port
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) for _ in range(IDLE_CONNECTIONS)]
    try:
        time.sleep(0.5)  # every connection accepted
        assert threading.active_count() - before <= 2, threading.active_count() - before
        assert _scrape(port) == 200  # the scraper still gets its answer while they stay open
    finally:
        for sock in idle:
            sock.close()
    assert _scrape(port) == 200


_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@pytest.mark.parametrize("which", ["gRPC port", "health port"])
def test_garbage_to_health_and_reflection_is_invalid_argument_without_a_traceback(
    noisy: ServerThread, which: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = noisy.server.port if which == "gRPC port" else noisy.server.health_port
    garbage = b"\xff\xff\xff\xff"
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls: list[Callable[[], Any]] = [
            lambda: channel.unary_unary(_HEALTH_CHECK)(garbage, timeout=TIMEOUT_S),
            lambda: list(channel.unary_stream("/grpc.health.v1.Health/Watch")(garbage, timeout=TIMEOUT_S)),
        ]
        if which == "gRPC port":
            reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            calls.append(lambda: list(channel.stream_stream(reflection)(iter([garbage]), timeout=TIMEOUT_S)))
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            codes.append(caught.value.code())
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(calls)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_refused_calls_log_one_line_per_reason_per_interval(
    store_settings: StoreSettings,
    model_store: ModelStore,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(access, "REFUSAL_LOG_EVERY_S", 1.0)
    thread = ServerThread(make_settings(store_settings, pins=(), security=Security(token=TOKEN)), store=model_store)
    caplog.set_level(logging.INFO, logger="server.api.access")
    try:
        with grpc.insecure_channel(thread.address) as channel:
            get_status = GENERATION["GetStatus"][0]
            for _ in range(50):
                assert code_of(get_status, channel, bearer("guess-0123456789"), []) is UNAUTHENTICATED
            first = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            time.sleep(1.1)
            assert code_of(get_status, channel, bearer("guess-0123456789"), []) is UNAUTHENTICATED
    finally:
        thread.close()
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(first) == 1, first
    assert len(lines) == 2 and "(49 more like it since the last such line, not logged)" in lines[1], lines
