"""Damaged weights through a real server (issue 13, finding 3): a flipped byte in a cached model never makes a
different image (the model is fetched again, or the request fails), and a server whose pinned model is damaged
starts, says so in GetStatus and its log, and serves the other pairs."""

from __future__ import annotations

import io
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from modelstore import ModelStore, StoreSettings, parse_air
from modelstore._safetensors_header import read_header
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import status_pb2, status_pb2_grpc
from server.core.domain import PairKey
from tests.conftest import TINY_BASE, TINY_REFINER
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage
from tests.fixtures.ldm_layout import write_single_file

from .conftest import TIMEOUT_S, ServerThread, collect, events, make_settings, new_stub

CIVITAI_BASE = "civitai:7@8"
READY = "refinery.v1.GenerationService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNET = "unet/diffusion_pytorch_model.safetensors"


def copy_cache(source: Path, dest: Path) -> Path:
    """The session's cache (tiny built-in models already built) as a cache of this test's own."""
    dest.mkdir(parents=True)
    for folder in ("blobs", "models"):
        _copy_tree(source / folder, dest / folder)
    with sqlite3.connect(source / "index.sqlite") as src, sqlite3.connect(dest / "index.sqlite") as dst:
        src.backup(dst)
    return dest


def _copy_tree(source: Path, dest: Path) -> None:
    for path in sorted(source.rglob("*")):
        target = dest / path.relative_to(source)
        if path.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.readlink())
        elif path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


def flip_byte_at(path: Path, offset: int) -> None:
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def in_the_unet(path: Path) -> int:
    """An offset inside a UNet weight of a safetensors file (its header stays intact)."""
    header = read_header(path)
    key = next(k for k in sorted(header.tensors) if "up_blocks" in k or "output_blocks" in k)
    return header.data_offset + header.tensors[key].start + 1


def pixels(thread: ServerThread, model: str = TINY_BASE) -> np.ndarray:  # type: ignore[type-arg]
    with grpc.insecure_channel(thread.address) as channel:
        request = pb.GenerateRequest(positive_prompt="a lighthouse", model=model, steps=6, seed=7)
        (image,) = events(collect(new_stub(channel), request), "image")
    return np.asarray(Image.open(io.BytesIO(image.data)))


def test_a_flipped_byte_in_a_cached_unet_never_makes_a_different_image(
    tmp_path: Path, store_settings: StoreSettings, caplog: pytest.LogCaptureFixture
) -> None:
    cache = copy_cache(store_settings.cache_dir, tmp_path / "cache")
    settings = StoreSettings(cache_dir=cache, offline=True)

    def server() -> ServerThread:  # a new process, as far as the store can tell: nothing checked yet
        return ServerThread(make_settings(settings, pins=()), store=ModelStore(settings))

    first = server()
    try:
        before = pixels(first)
        blob = (first.server.store.describe(TINY_BASE).path / UNET).resolve()
    finally:
        first.close()
        first.server.store.close()
    flip_byte_at(blob, in_the_unet(blob))
    caplog.set_level(logging.WARNING)

    second = server()
    try:
        after = pixels(second)
    finally:
        second.close()
        second.server.store.close()

    assert np.array_equal(after, before)  # the built-in model was rebuilt, byte for byte
    assert f"{TINY_BASE}: {UNET} changed since it entered the cache" in caplog.text
    assert (cache / "quarantine" / blob.name).is_file()


@pytest.fixture
def civitai_base(tmp_path: Path, model_store: ModelStore) -> Iterator[tuple[FakeCivitai, bytes]]:
    """The tiny base as a civitai single-file checkpoint, served by the fake civitai and its storage host."""
    data = write_single_file(model_store.resolve(TINY_BASE).path, tmp_path / "base.safetensors").read_bytes()
    storage = FakeStorage()
    civitai = FakeCivitai(storage)
    civitai.add_version(7, 8, [(FakeFile(9, "base.safetensors"), data)])
    try:
        yield civitai, data
    finally:
        civitai.close()
        storage.close()


def _damaged_civitai_cache(tmp_path: Path, store_settings: StoreSettings, civitai: FakeCivitai) -> StoreSettings:
    """A cache holding the tiny built-in pair and the civitai base, whose UNet has one byte flipped; offline."""
    cache = copy_cache(store_settings.cache_dir, tmp_path / "cache")
    online = ModelStore(StoreSettings(cache_dir=cache, civitai_api=civitai.url))
    try:
        path = online.pull(CIVITAI_BASE).path.resolve()
    finally:
        online.close()
    flip_byte_at(path, in_the_unet(path))
    return StoreSettings(cache_dir=cache, offline=True)


def _status(channel: grpc.Channel) -> status_pb2.GetStatusResponse:
    stub = status_pb2_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
    response: status_pb2.GetStatusResponse = stub.GetStatus(status_pb2.GetStatusRequest(), timeout=TIMEOUT_S)
    return response


def _ready(channel: grpc.Channel) -> int:
    health = health_pb2_grpc.HealthStub(channel)
    status: int = health.Check(health_pb2.HealthCheckRequest(service=READY), timeout=TIMEOUT_S).status
    return status


def test_a_damaged_pinned_model_is_reported_and_the_other_pairs_are_served(
    tmp_path: Path,
    store_settings: StoreSettings,
    civitai_base: tuple[FakeCivitai, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = _damaged_civitai_cache(tmp_path, store_settings, civitai_base[0])
    store = ModelStore(settings)
    pins = (PairKey(parse_air(CIVITAI_BASE), None), PairKey(parse_air(TINY_BASE), parse_air(TINY_REFINER)))
    thread = ServerThread(make_settings(settings, pins=pins), store=store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as channel:
            status, ready = _status(channel), _ready(channel)
            image = pixels(thread)
            with pytest.raises(grpc.RpcError) as refused:
                pixels(thread, CIVITAI_BASE)
    finally:
        thread.close()
        store.close()

    assert ready == SERVING
    (failure,) = status.pin_failures
    assert (failure.model, failure.refiner_model) == (CIVITAI_BASE, "")
    assert failure.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert failure.error.message.startswith(f"model: {CIVITAI_BASE}: model.safetensors changed since it entered")
    assert "offline mode" in failure.error.message
    assert [(p.model, p.refiner_model) for p in status.devices[0].pairs] == [(TINY_BASE, TINY_REFINER)]
    assert image.shape == (64, 64, 3)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # never an image from the damaged weights
    assert "model.safetensors failed its check; it was set aside" in (refused.value.details() or "")
    assert f"could not pin {CIVITAI_BASE}" in caplog.text


def test_when_every_pinned_pair_fails_the_server_lives_but_is_not_ready_until_one_is_pinned(
    tmp_path: Path, store_settings: StoreSettings, civitai_base: tuple[FakeCivitai, bytes]
) -> None:
    settings = _damaged_civitai_cache(tmp_path, store_settings, civitai_base[0])
    store = ModelStore(settings)
    thread = ServerThread(make_settings(settings, pins=(PairKey(parse_air(CIVITAI_BASE), None),)), store=store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            alive = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S).status
            ready_before = _ready(channel)
            failures_before = len(_status(channel).pin_failures)
            image = pixels(thread)  # a call that reaches it is served all the same
            pin = status_pb2.PinPairRequest(model=TINY_BASE, refiner_model=TINY_REFINER)
            status_pb2_grpc.ServerServiceStub(channel).PinPair(pin, timeout=TIMEOUT_S)  # type: ignore[no-untyped-call]
            ready_after = _ready(channel)
    finally:
        thread.close()
        store.close()

    assert (alive, ready_before, failures_before) == (SERVING, NOT_SERVING, 1)
    assert image.shape == (64, 64, 3)
    assert ready_after == SERVING
