"""The metrics port as Prometheus and an operator see it: valid exposition (promtool), every gauge with a
series at zero on a fresh server, calls counted by gRPC status code with refusals included, and nothing but
/metrics served."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb

from .conftest import ServerThread, collect, make_settings, new_stub


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    thread = ServerThread(make_settings(store_settings, metrics_port=_free_port()), store=model_store)
    try:
        thread.wait_ready()
        yield thread
    finally:
        thread.close()


def _page(thread: ServerThread, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{thread.server.metrics_port}{path}", timeout=30) as r:
        return str(r.read().decode())


def _sample(page: str, name: str) -> float:
    (line,) = [line for line in page.splitlines() if line.startswith(name + " ") or line == name]
    return float(line.rsplit(" ", 1)[1])


def test_a_fresh_server_has_a_zero_series_for_every_gauge(served: ServerThread) -> None:
    page = _page(served)
    assert 'refinery_queue_depth{priority="0"} 0.0' in page
    assert 'refinery_jobs_running{device="cpu"} 0.0' in page
    assert 'refinery_jobs_total{outcome="failed"} 0.0' in page
    assert 'refinery_build_info{version="' in page and "refinery_download_bytes_total" in page


def test_calls_are_counted_by_status_code_refused_ones_included(served: ServerThread) -> None:
    with grpc.insecure_channel(served.address) as channel:
        stub = new_stub(channel)
        collect(stub, pb.GenerateRequest(positive_prompt="a calm sea", steps=2))
        with pytest.raises(grpc.RpcError):
            collect(stub, pb.GenerateRequest(positive_prompt="", steps=2))  # refused: blank prompt
    # A call is counted as its handler returns, which may be just after the client saw its status.
    expected = (
        'refinery_requests_total{code="OK",method="Generate"}',
        'refinery_requests_total{code="INVALID_ARGUMENT",method="Generate"}',
        "refinery_images_total",
        "refinery_first_step_seconds_count",
        'refinery_request_seconds_count{outcome="ok"}',
    )
    deadline = time.monotonic() + 30
    while True:
        page = _page(served)
        samples = dict(line.rsplit(" ", 1) for line in page.splitlines() if not line.startswith("#"))
        missing = [name for name in expected if float(samples.get(name, 0)) < 1]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert missing == [], page


def test_only_the_metrics_path_is_served(served: ServerThread) -> None:
    for path in ("/", "/healthz", "/metricsx"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            _page(served, path)
        assert caught.value.code == 404
        caught.value.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (.ci/fleet.sh installs it)")
def test_promtool_accepts_the_exposition(served: ServerThread) -> None:
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=_page(served), capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
