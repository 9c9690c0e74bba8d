"""Issue 13, finding 7: a drain a balancer can see. On SIGTERM (or `stop()`), health turns NOT_SERVING while
the server still accepts and serves calls for the drain delay; then the port closes. With a delay of 0 the port
closes at once, as before."""

from __future__ import annotations

import signal
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from tests.integration.conftest import ServerThread, make_settings, new_stub

from .conftest import TIMEOUT_S, ServeProcess, get_status, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = "refinery.v1.GenerationService"


def health(address: str, service: str = "") -> Any:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S).status


def new_client_status(address: str) -> grpc.StatusCode:
    """GetStatus on a new connection, as a new client would call."""
    with grpc.insecure_channel(address) as channel:
        return get_status(channel)


def test_during_the_drain_delay_health_says_not_serving_and_calls_are_still_served(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    # A long delay, so that a slow machine cannot end it mid-test; stop(0) ends it, as a second signal would.
    thread = ServerThread(make_settings(store_settings, drain_delay_s=60.0), store=model_store)
    try:
        thread.wait_ready()
        stopping = thread.stop_in_background()
        wait_until(lambda: health(thread.address) == NOT_SERVING, "health says NOT_SERVING")
        assert health(thread.address, READINESS) == NOT_SERVING
        # A client that has not yet heard still gets its images.
        with grpc.insecure_channel(thread.address) as channel:
            responses = list(new_stub(channel).Generate(pb.GenerateRequest(positive_prompt="late", steps=2)))
        assert [r.WhichOneof("event") for r in responses].count("image") == 1
        assert new_client_status(thread.address) is grpc.StatusCode.OK
        assert not stopping.done()
        thread.call(thread.server.stop(0))
        stopping.result(TIMEOUT_S)
        assert new_client_status(thread.address) is grpc.StatusCode.UNAVAILABLE  # then the port is closed
    finally:
        thread.close()


def test_with_no_drain_delay_the_port_closes_at_once(store_settings: StoreSettings, model_store: ModelStore) -> None:
    thread = ServerThread(make_settings(store_settings, pins=(), drain_delay_s=0.0), store=model_store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
            assert next(watch).status == SERVING
            stopping = thread.stop_in_background()
            assert next(watch).status == NOT_SERVING
            watch.cancel()
        assert new_client_status(thread.address) is grpc.StatusCode.UNAVAILABLE
        stopping.result(TIMEOUT_S)
    finally:
        thread.close()


def test_sigterm_keeps_serving_for_the_drain_delay_then_exits(serve_process: Any) -> None:
    server: ServeProcess = serve_process("--pin", "none", "--drain-delay", "5")
    wait_until(lambda: health(server.address, READINESS) == SERVING, "the server is ready")
    server.signal(signal.SIGTERM)
    wait_until(lambda: health(server.address) == NOT_SERVING, "health says NOT_SERVING")
    assert new_client_status(server.address) is grpc.StatusCode.OK  # still accepted and served
    assert server.wait() == 0
    assert new_client_status(server.address) is grpc.StatusCode.UNAVAILABLE
    assert "still accepting calls for 5.0s" in server.log
    assert "Traceback" not in server.log


def test_a_second_sigterm_cuts_the_drain_delay_short(serve_process: Any) -> None:
    server: ServeProcess = serve_process("--pin", "none", "--drain-delay", "600")
    wait_until(lambda: health(server.address, READINESS) == SERVING, "the server is ready")
    server.signal(signal.SIGTERM)
    wait_until(lambda: health(server.address) == NOT_SERVING, "health says NOT_SERVING")
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0  # well before the 600 s delay
    assert "Traceback" not in server.log
