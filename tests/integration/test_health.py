"""What operators and tools see: health (liveness vs readiness, draining), reflection, graceful shutdown."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb

from .conftest import TIMEOUT_S, GatedLoader, ServerThread, collect, events, make_settings, new_stub

SERVICE = "refinery.v1.GenerationService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(channel: grpc.Channel, service: str) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S).status


def test_health_is_serving_once_the_default_models_are_loaded(channel: grpc.Channel) -> None:
    # The shared server fixture waited for its preload.
    assert check(channel, "") == SERVING
    assert check(channel, SERVICE) == SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    method = database.FindFileContainingSymbol(SERVICE)
    assert method.package == "refinery.v1"


def test_live_but_not_ready_while_preloading(store_settings: StoreSettings, model_store: ModelStore) -> None:
    loader = GatedLoader()
    thread = ServerThread(make_settings(store_settings), store=model_store, loader=loader)
    try:
        with grpc.insecure_channel(thread.address) as chan:
            assert check(chan, "") == SERVING  # the process is alive: a liveness probe must not kill it
            assert check(chan, SERVICE) == NOT_SERVING  # not ready for traffic yet
            loader.release.set()
            thread.wait_ready()
            assert check(chan, SERVICE) == SERVING
    finally:
        loader.release.set()
        thread.close()


def test_drain_finishes_running_work_and_refuses_new(store_settings: StoreSettings, model_store: ModelStore) -> None:
    loader = GatedLoader()  # holds the in-flight job until the drain has begun
    settings = make_settings(store_settings, pins=(), grace_period_s=60.0)
    thread = ServerThread(settings, store=model_store, loader=loader)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as chan:
            stub = new_stub(chan)
            watch = health_pb2_grpc.HealthStub(chan).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT_S
            )
            assert next(watch).status == SERVING

            in_flight = stub.Generate(pb.GenerateRequest(positive_prompt="a lighthouse", steps=6), timeout=TIMEOUT_S)
            assert next(in_flight).WhichOneof("event") == "queued"
            assert next(in_flight).WhichOneof("event") == "model_loading"

            stopping = thread.stop_in_background()
            assert next(watch).status == NOT_SERVING  # load balancers stop sending traffic
            watch.cancel()
            # Nothing new is accepted ...
            with pytest.raises(grpc.RpcError) as caught:
                collect(stub, pb.GenerateRequest(positive_prompt="too late", steps=2))
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

            # ... but the request already running completes within the grace period.
            loader.release.set()
            rest = list(in_flight)
            assert len(events(rest, "progress")) == 6
            assert len(events(rest, "image")) == 1
            stopping.result(TIMEOUT_S)
    finally:
        loader.release.set()
        thread.close()
