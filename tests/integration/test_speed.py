"""The tuned service on the tiny base, with Inductor really compiling on the CPU (minutes on a busy 2-core
machine, so one test does it all): readiness does not wait for the compile, GetStatus and the metrics say which
shapes are compiled, requests switch to the compiled graph once it is ready, and a restarted server compiles
nothing again because the caches are on disk. A bad speed setting is refused before anything starts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch._dynamo
from prometheus_client import generate_latest
from torch._dynamo.utils import counters

from modelstore import ModelStore, StoreSettings, parse_air
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import status_pb2, status_pb2_grpc
from server.core.domain import PairKey
from server.core.settings import DEFAULT_BASE, Speed, Toggle
from tests.integration.conftest import ServerThread, collect, events, make_settings, new_stub

COMPILE_WAIT_S = 1800  # Inductor on a loaded CI machine; a hang fails, no expectation about speed
READY = status_pb2.CompiledShape.STATE_READY


def _status(channel: grpc.Channel) -> status_pb2.DeviceStatus:
    stub = status_pb2_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
    response: status_pb2.GetStatusResponse = stub.GetStatus(status_pb2.GetStatusRequest(), timeout=30)
    return response.devices[0]


def _wait_compiled(channel: grpc.Channel) -> status_pb2.DeviceStatus:
    deadline = time.monotonic() + COMPILE_WAIT_S
    while (device := _status(channel)).compiled_shapes[0].state != READY:
        assert device.compiled_shapes[0].state != status_pb2.CompiledShape.STATE_FAILED, device.compiled_shapes
        assert time.monotonic() < deadline, "the compile never finished"
        time.sleep(0.5)
    return device


def _generate(channel: grpc.Channel, n: int) -> list[Any]:
    request = pb.GenerateRequest(positive_prompt="a lighthouse", steps=4, seed=9, number_results=n)
    return events(collect(new_stub(channel), request), "image")


@pytest.mark.slow
def test_pinned_shapes_compile_in_the_background_and_a_restart_compiles_nothing(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    torch._dynamo.reset()  # graphs other tests traced would otherwise serve this one
    speed = Speed(
        compile="default",
        fuse_qkv=Toggle.ON,
        channels_last=Toggle.ON,
        vae_decode="bfloat16",
        compile_cache_dir=tmp_path / "compile",
    )
    settings = make_settings(store_settings, pins=(PairKey(parse_air(DEFAULT_BASE), None),), max_batch=2, speed=speed)
    server = ServerThread(settings, store=model_store)
    try:
        server.wait_ready()  # SERVING once the pair is loaded: the compile goes on in the background
        with grpc.insecure_channel(server.address) as channel:
            device = _status(channel)
            assert device.tuning == "compile default, fused QKV, channels-last UNets, bfloat16 VAE decode"
            (shape,) = device.compiled_shapes
            assert (shape.model, shape.role, shape.width, shape.height) == (DEFAULT_BASE, 1, 64, 64)
            assert shape.pinned and shape.max_images == 2 and shape.state != status_pb2.CompiledShape.STATE_FAILED
            assert len(_generate(channel, 1)) == 1  # served while compiling (eagerly, or compiled once ready)

            before = _wait_compiled(channel)
            assert len(_generate(channel, 2)) == 2
            after = _status(channel)
            assert after.compiled_unet_calls == before.compiled_unet_calls + 4  # 4 steps of one batch of 2
            assert after.eager_unet_calls == before.eager_unet_calls
            scraped = generate_latest(server.server.metrics.registry).decode()
            labels = f'device="cpu",model="{DEFAULT_BASE}",role="base",size="64x64",state="ready"'
            assert f"refinery_compiled_shapes{{{labels}}} 1.0" in scraped
            assert 'refinery_unet_calls_total{device="cpu",path="compiled"}' in scraped
    finally:
        server.close()

    # The compiled code is where the settings put it (the model cache's volume by default).
    assert any(path.is_file() for path in (tmp_path / "compile" / "fxgraph").rglob("*"))
    # A restart: nothing in memory (Dynamo forgets its graphs), everything on disk.
    torch._dynamo.reset()
    misses = counters["inductor"]["fxgraph_cache_miss"]
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    server = ServerThread(settings, store=model_store)
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.address) as channel:
            _wait_compiled(channel)
        assert counters["inductor"]["fxgraph_cache_miss"] == misses
        assert counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] > hits
    finally:
        server.close()
        torch._dynamo.reset()
