"""The scheduler through a real gRPC server with the real tiny pipelines: batches that equal solo runs,
overload refused with RetryInfo, the status RPC and the Prometheus page, and memory really returned."""

from __future__ import annotations

import gc
import io
import time
import urllib.request
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from modelstore import ModelRecord, ModelStore, StoreSettings, components
from modelstore.components import components_of
from modelstore.loading import load_pipeline
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import status_pb2 as status_pb
from refinery.v1 import status_pb2_grpc as status_grpc
from server.core.settings import DEFAULT_BASE, DEFAULT_REFINER
from tests.fixtures.tiny import another_base

from .conftest import TIMEOUT_S, ServerThread, bad_request_fields, collect, events, make_settings, new_stub

PAIR = f"{DEFAULT_BASE}+{DEFAULT_REFINER}"


def request(prompt: str, seed: int, steps: int = 6) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        positive_prompt=prompt, seed=seed, steps=steps, refiner=pb.Refiner(start_step_percentage=75)
    )


def rgb(data: bytes) -> numpy.ndarray[Any, Any]:
    return numpy.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=numpy.int16)


class Gate:
    """A loader wrapper that keeps weak references to what it loaded, to see it freed after eviction."""

    def __init__(self) -> None:
        self.unets: dict[str, weakref.ref[Any]] = {}

    def __call__(self, record: ModelRecord, *, role: str, **kwargs: Any) -> Any:
        pipe = load_pipeline(record, role=role, **kwargs)
        self.unets[f"{record.canonical}/{role}"] = weakref.ref(pipe.unet)
        return pipe


@pytest.fixture
def batching_server(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    thread = ServerThread(make_settings(store_settings, max_batch=4, metrics_port=0), store=model_store)
    try:
        thread.wait_ready()
        yield thread
    finally:
        thread.close()


def test_batched_requests_each_equal_their_solo_run(batching_server: ServerThread) -> None:
    prompts = [("a red fox in snow", 11), ("a lighthouse at night", 22), ("a bowl of ramen", 33)]
    with grpc.insecure_channel(batching_server.address) as channel:
        stub = new_stub(channel)
        solo = {p: events(collect(stub, request(p, s)), "image")[0].data for p, s in prompts}
        # A long request occupies the device so the three queue up together and run as one batch.
        with ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(collect, stub, request("keep the device busy", 1, steps=60))
            futures = {p: pool.submit(collect, stub, request(p, s)) for p, s in prompts}
            results = {p: f.result(TIMEOUT_S) for p, f in futures.items()}
            blocker.result(TIMEOUT_S)
    registry = batching_server.server.metrics.registry
    images = registry.get_sample_value("refinery_batch_images_sum")
    assert images is not None and images >= 5 and max(b for b, c in _histogram(registry).items() if c) >= 2, (
        "nothing batched"
    )
    for prompt, responses in results.items():
        assert [p.image_indices for p in events(responses, "progress")] == [[0]] * 6  # its own progress
        got, want = rgb(events(responses, "image")[0].data), rgb(solo[prompt])
        # Denoised together with other prompts, an image may differ from its solo run by float rounding
        # (kernels sum in another order for another batch size): a level here and there, never more.
        assert numpy.abs(got - want).max() <= 2, f"{prompt!r} is not its solo image"
        assert (got != want).mean() < 0.01


def _histogram(registry: Any) -> dict[float, float]:
    """refinery_batch_images: bucket upper bound -> count in that bucket (not cumulative)."""
    bounds = (1, 2, 3, 4, 6, 8, 12, 16)
    counts: dict[float, float] = {}
    previous = 0.0
    for bound in bounds:
        value = registry.get_sample_value("refinery_batch_images_bucket", {"le": f"{float(bound)}"}) or 0.0
        counts[float(bound)] = value - previous
        previous = value
    return counts


def test_status_rpc_and_metrics_page(batching_server: ServerThread) -> None:
    with grpc.insecure_channel(batching_server.address) as channel:
        collect(new_stub(channel), request("a quiet lake", 5))
        status = status_grpc.ServerServiceStub(channel).GetStatus(status_pb.GetStatusRequest(), timeout=TIMEOUT_S)  # type: ignore[no-untyped-call]
    (device,) = status.devices
    assert device.name == "cpu" and device.budget_bytes > 0
    (pair,) = device.pairs
    assert (pair.model, pair.refiner_model, pair.pinned) == (DEFAULT_BASE, DEFAULT_REFINER, True)
    assert 0 < pair.bytes == device.resident_bytes <= device.budget_bytes
    assert status.queue.max_queue == 64 and status.queue.depth == 0
    # Untuned on the CPU by default: nothing compiled.
    assert device.tuning == "compile off" and list(device.compiled_shapes) == []

    port = batching_server.server.metrics_port
    assert port == 0  # off unless asked for


def test_the_device_busy_time_grows_with_each_batch(batching_server: ServerThread) -> None:
    def busy_s(channel: grpc.Channel) -> float:
        status = status_grpc.ServerServiceStub(channel).GetStatus(status_pb.GetStatusRequest(), timeout=TIMEOUT_S)  # type: ignore[no-untyped-call]
        return float(status.devices[0].busy_time.ToNanoseconds()) / 1e9

    with grpc.insecure_channel(batching_server.address) as channel:
        before = busy_s(channel)
        collect(new_stub(channel), request("a quiet lake", 5))
        # Counted when the batch leaves the device, which may be just after its images reached the client.
        deadline = time.monotonic() + TIMEOUT_S
        while busy_s(channel) <= before:
            assert time.monotonic() < deadline, "the batch's time was never counted"
            time.sleep(0.01)


def test_metrics_are_served_when_asked_for(store_settings: StoreSettings, model_store: ModelStore) -> None:
    thread = ServerThread(make_settings(store_settings, metrics_port=_free_port()), store=model_store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as channel:
            collect(new_stub(channel), request("a field of tulips", 8))
        with urllib.request.urlopen(f"http://127.0.0.1:{thread.server.metrics_port}/metrics", timeout=30) as r:
            page = r.read()
    finally:
        thread.close()
    text = page.decode()
    for line in (
        'refinery_jobs_total{outcome="ok"} 1.0',
        'refinery_resident_bytes{device="cpu"}',
        'refinery_budget_bytes{device="cpu"}',
        "refinery_queue_wait_seconds_count 1.0",
        'refinery_step_seconds_count{stage="base"}',
        'refinery_model_load_seconds_count{device="cpu"} 1.0',
        'refinery_device_busy_seconds_total{device="cpu"}',
    ):
        assert line in text, f"{line!r} missing from /metrics"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_overload_is_resource_exhausted_with_a_retry_delay(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    thread = ServerThread(make_settings(store_settings, max_queue=1, max_batch=1), store=model_store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as channel, ThreadPoolExecutor(2) as pool:
            stub = new_stub(channel)
            running = stub.Generate(request("busy", 1, steps=80), timeout=TIMEOUT_S)
            for response in running:  # until it runs on the device: the queue is then empty
                if response.WhichOneof("event") == "progress":
                    break
            queued = pool.submit(collect, stub, request("waiting", 2))
            _wait_for_depth(thread, 1)
            with pytest.raises(grpc.RpcError) as refused:
                collect(stub, request("one too many", 3))
            assert list(running)[-1].WhichOneof("event") == "image"
            assert events(queued.result(TIMEOUT_S), "image")  # admitted requests still complete
    finally:
        thread.close()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(refused.value)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details) and retry.retry_delay.seconds >= 1


def _wait_for_depth(thread: ServerThread, depth: int) -> None:
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while thread.server.scheduler.queue.depth() < depth:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_an_evicted_pair_really_leaves_memory(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    """A budget for one pair: switching to another base frees the first pair's UNets (the objects, not only
    the scheduler's references to them) and keeps what the new pair shares."""
    other = another_base(model_store, tmp_path)
    pair_bytes = sum(
        c.full_bytes
        for c in {
            c.fingerprint: c for m in (DEFAULT_BASE, DEFAULT_REFINER) for c in components_of(model_store.resolve(m))
        }.values()
    )
    loader = Gate()
    settings = make_settings(store_settings, pins=(), budget_bytes=pair_bytes + 1_000_000)
    thread = ServerThread(settings, store=model_store, loader=loader)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = new_stub(channel)
            collect(stub, request("with the refiner", 1))
            collect(stub, pb.GenerateRequest(positive_prompt="another base", seed=2, steps=4, model=other))
        gc.collect()
        assert loader.unets[f"{DEFAULT_REFINER}/refiner"]() is None, "the evicted refiner UNet is still alive"
        assert loader.unets[f"{DEFAULT_BASE}/base"]() is None, "the evicted base UNet is still alive"
        keys = [(p.key.base, p.key.refiner) for p in thread.server.scheduler.workers[0].residency.resident()]
        assert keys == [(other, None)]
    finally:
        thread.close()


def test_a_resident_model_is_listed_as_such_and_cannot_be_deleted(channel: grpc.Channel) -> None:
    from refinery.v1 import models_pb2, models_pb2_grpc

    models = models_pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    listed = {m.model: m for m in models.ListModels(models_pb2.ListModelsRequest(), timeout=TIMEOUT_S).models}
    assert listed[DEFAULT_BASE].resident and listed[DEFAULT_REFINER].resident  # the pinned pair
    with pytest.raises(grpc.RpcError) as refused:
        models.DeleteModel(models_pb2.DeleteModelRequest(model=DEFAULT_REFINER), timeout=TIMEOUT_S)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION


def test_pin_and_unpin_a_pair_at_run_time(store_settings: StoreSettings, model_store: ModelStore) -> None:
    thread = ServerThread(make_settings(store_settings, pins=()), store=model_store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as channel:
            servers = status_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
            pair = status_pb.PinPairRequest(model=DEFAULT_BASE, refiner_model=DEFAULT_REFINER)
            (device,) = servers.PinPair(pair, timeout=TIMEOUT_S).devices
            assert [(p.model, p.refiner_model, p.pinned) for p in device.pairs] == [
                (DEFAULT_BASE, DEFAULT_REFINER, True)
            ]
            responses = collect(new_stub(channel), request("a quiet lake", 5))
            assert events(responses, "model_loading") == [] and len(events(responses, "image")) == 1

            unpin = status_pb.UnpinPairRequest(model=DEFAULT_BASE, refiner_model=DEFAULT_REFINER)
            (device,) = servers.UnpinPair(unpin, timeout=TIMEOUT_S).devices
            assert [(p.model, p.pinned) for p in device.pairs] == [(DEFAULT_BASE, False)]  # still resident
            with pytest.raises(grpc.RpcError) as caught:
                servers.UnpinPair(unpin, timeout=TIMEOUT_S)
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND and "is not pinned" in caught.value.details()

            for bad, code, field in (
                (status_pb.PinPairRequest(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
                (status_pb.PinPairRequest(model="civitai:101055@"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
                (
                    status_pb.PinPairRequest(model=DEFAULT_BASE, refiner_model="builtin:no-such-model@1"),
                    grpc.StatusCode.NOT_FOUND,
                    "refiner_model",
                ),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    servers.PinPair(bad, timeout=TIMEOUT_S)
                assert caught.value.code() is code and bad_request_fields(caught.value) == [field]
    finally:
        thread.close()


def test_the_first_use_of_a_local_model_shows_its_hashing(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registering a local model and measuring its components read every weight: seconds per GB that the
    client sees as VERIFYING progress rather than as a silent queue."""
    monkeypatch.setattr(components, "_memo", {})  # as in a fresh process: nothing measured yet
    local = another_base(model_store, tmp_path)
    weights = sum(p.stat().st_size for p in Path(local.removeprefix("local:")).rglob("*") if p.is_file())
    fresh = ModelStore(replace(store_settings, cache_dir=tmp_path / "fresh-cache"))  # no memo on disk either
    thread = ServerThread(make_settings(fresh.settings, pins=()), store=fresh)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            first = collect(new_stub(channel), pb.GenerateRequest(positive_prompt="a fox", model=local, steps=4))
            again = collect(new_stub(channel), pb.GenerateRequest(positive_prompt="a fox", model=local, steps=4))
    finally:
        thread.close()
        fresh.close()

    phases = [(m.model, m.phase) for m in events(first, "model_loading")]
    verifying = [m for m in events(first, "model_loading") if m.phase == pb.ModelLoading.PHASE_VERIFYING]
    assert verifying and all(m.model == local and m.role == pb.MODEL_ROLE_BASE for m in verifying)
    # The files were hashed (every byte of the folder), then the weights read to fingerprint the components.
    finished = [m for m in verifying if m.bytes_done == m.bytes_total > 0]
    assert len(finished) == 2 and finished[0].bytes_total == weights
    assert phases.index((local, pb.ModelLoading.PHASE_VERIFYING)) < phases.index((local, pb.ModelLoading.PHASE_LOADING))
    assert len(events(first, "image")) == 1
    assert not [m for m in events(again, "model_loading") if m.phase == pb.ModelLoading.PHASE_VERIFYING]
