"""`refinery.v1.ModelService` end to end: a real gRPC server on loopback whose store downloads from the fake
civitai API and its separate fake storage host."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from modelstore import ModelStore, StoreSettings, components
from modelstore._safetensors_header import read_header
from modelstore.progress import _MIN_INTERVAL_S
from modelstore.record import Architecture
from refinery.v1 import models_pb2 as pb
from refinery.v1 import models_pb2_grpc as pb_grpc
from server.api.convert import ARCHITECTURES
from server.api.model_service import ModelService
from tests.conftest import CIVITAI_TOKEN
from tests.fakes import payloads
from tests.fakes.cachefs import blob_files, partial_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage
from tests.fixtures.tiny import another_base

from .conftest import TIMEOUT_S, ServerThread, bad_request_fields, make_settings, wait_for_download_to_stop

TOKEN = CIVITAI_TOKEN
BASE = "civitai:101055@128078"
REFINER = "civitai:101055@128080"
QUOTA = 1 << 30


@dataclass
class Service:
    stub: pb_grpc.ModelServiceStub
    store: ModelStore
    cache: Path


@pytest.fixture
def store(tmp_path: Path, civitai: FakeCivitai) -> Iterator[ModelStore]:
    settings = StoreSettings(
        cache_dir=tmp_path / "cache", civitai_api=civitai.url, civitai_token=TOKEN, max_bytes=QUOTA
    )
    opened = ModelStore(settings)
    yield opened
    opened.close()


@pytest.fixture
def service(store: ModelStore) -> Iterator[Service]:
    """The whole server (`RefineryServer`), as `refinery serve` runs it, with nothing preloaded."""
    thread = ServerThread(make_settings(store.settings, pins=()), store=store)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            yield Service(stub, store, store.settings.cache_dir)
    finally:
        thread.close()


def add_pair(civitai: FakeCivitai, *, extra_bytes: int = 0) -> tuple[bytes, bytes]:
    """Two checkpoint versions as civitai lists them, each with a VAE marked primary."""
    base = payloads.checkpoint("base", seed=1, extra_bytes=extra_bytes)
    refiner = payloads.checkpoint("refiner", seed=2)
    vae = payloads.checkpoint("plain", seed=3)
    civitai.add_version(
        101055,
        128078,
        [(FakeFile(126001, "sdxl_vae.safetensors", type="VAE", primary=True), vae), (FakeFile(126002, "b"), base)],
    )
    civitai.add_version(
        101055,
        128080,
        [(FakeFile(126003, "sdxl_vae.safetensors", type="VAE", primary=True), vae), (FakeFile(126004, "r"), refiner)],
        base_model_type="Refiner",
    )
    return base, refiner


def pull(stub: pb_grpc.ModelServiceStub, model: str, *, pin: bool = False) -> list[pb.PullModelResponse]:
    return list(stub.PullModel(pb.PullModelRequest(model=model, pin=pin), timeout=TIMEOUT_S))


def listing(stub: pb_grpc.ModelServiceStub) -> pb.ListModelsResponse:
    response: pb.ListModelsResponse = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT_S)
    return response


# ---- PullModel ---------------------------------------------------------------------------------------------


def test_pull_streams_progress_while_downloading_then_the_record(
    service: Service, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    data, _ = add_pair(civitai, extra_bytes=4_000_000)
    link = civitai.object_of(128078, 126002)
    link.hold_after = 1_000_000  # the link stalls after 1 MB until the test lets it go on

    stream = service.stub.PullModel(pb.PullModelRequest(model=BASE), timeout=TIMEOUT_S)
    first = next(stream)
    # Received while the download is held mid-way: the stream is live, not a report at the end.
    assert first.WhichOneof("event") == "progress" and first.progress.bytes_done < len(data)
    time.sleep(_MIN_INTERVAL_S * 1.5)  # progress is reported at most every _MIN_INTERVAL_S: let one more out
    link.release.set()
    responses = [first, *stream]

    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[-1] == "model" and set(kinds[:-1]) == {"progress"}
    progress = [r.progress for r in responses[:-1]]
    done = [p.bytes_done for p in progress]
    assert done == sorted(done)
    assert any(0 < d < len(data) for d in done), done  # seen part-way, not only at the start and the end
    assert (progress[-1].bytes_done, progress[-1].bytes_total) == (len(data), len(data))
    assert all(p.bytes_per_second >= 0 for p in progress) and progress[-1].bytes_per_second > 0
    assert {p.file for p in progress} == {"civitai:101055@128078+126002"} and not any(p.verifying for p in progress)

    info = responses[-1].model
    assert info.model == BASE
    assert info.architecture == pb.ARCHITECTURE_SDXL_BASE
    assert (info.size_bytes, info.sha256) == (len(data), payloads.sha256(data))
    assert not info.pinned and not info.resident
    assert info.added.seconds > 0 and info.last_used.ToDatetime() >= info.added.ToDatetime()
    # The model file was fetched, once, and never the VAE that civitai marks primary.
    assert [r.query.get("fileId") for r in civitai.downloads()] == ["126002"]
    assert len(storage.gets()) == 1

    again = pull(service.stub, "urn:air:sdxl:checkpoint:civitai:101055@128078")  # another spelling, same model
    # Cached: no download, but its file is checked again (VERIFYING progress) before the record.
    assert [r.WhichOneof("event") for r in again][-1] == "model"
    assert all(r.progress.verifying for r in again[:-1]) and again[-2].progress.bytes_done == len(data)
    assert again[-1].model.model == BASE and len(storage.gets()) == 1


def test_a_pull_the_client_cancels_stops_its_download_and_the_next_pull_resumes_it(
    service: Service, civitai: FakeCivitai, storage: FakeStorage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelstore.store")
    data, _ = add_pair(civitai, extra_bytes=8_000_000)
    link = civitai.object_of(128078, 126002)
    link.hold_after = 1_000_000
    link.trickle_s = 0.01  # a slow link: the rest would take seconds, the cancel reaches the server in far less

    stream = service.stub.PullModel(pb.PullModelRequest(model=BASE), timeout=TIMEOUT_S)
    assert next(stream).WhichOneof("event") == "progress"
    stream.cancel()  # the operator pressed ^C
    link.release.set()

    wait_for_download_to_stop(caplog, BASE)
    (partial,) = partial_files(service.cache)
    kept = partial.stat().st_size
    assert 0 < kept < len(data)  # stopped part-way; what arrived is kept
    assert listing(service.stub).models == []

    link.trickle_s = 0.0
    assert pull(service.stub, BASE)[-1].model.sha256 == payloads.sha256(data)
    assert storage.gets()[-1].headers["range"] == f"bytes={kept}-"  # resumed, not fetched again


def test_a_pulled_model_is_measured_so_its_first_generate_reads_no_weights(
    service: Service, civitai: FakeCivitai, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = add_pair(civitai)
    info = pull(service.stub, BASE)[-1].model

    # What the scheduler needs before placing a model (sizes and content fingerprints) was worked out by the
    # pull and kept on disk: another process (a restarted server) gets it without reading the checkpoint.
    monkeypatch.setattr(components, "_memo", {})
    monkeypatch.setattr(components, "_measure", _never_measure)
    record = service.store.lookup(BASE)
    assert record is not None and record.sha256 == info.sha256 == payloads.sha256(data)
    (unet,) = components.components_of(record, service.cache)
    header = read_header(record.path)
    unet_tensors = [t for k, t in header.tensors.items() if k.startswith("model.diffusion_model.")]
    assert unet.name == "unet" and unet.file_bytes == sum(t.end - t.start for t in unet_tensors)


def _never_measure(record: object) -> None:
    raise AssertionError("the weights were read again")


def test_pin_list_and_delete(service: Service, civitai: FakeCivitai) -> None:
    base, refiner = add_pair(civitai)
    assert pull(service.stub, BASE, pin=True)[-1].model.pinned
    assert not pull(service.stub, REFINER)[-1].model.pinned

    cache = listing(service.stub)
    assert [(m.model, m.architecture, m.size_bytes, m.pinned, m.resident) for m in cache.models] == [
        (BASE, pb.ARCHITECTURE_SDXL_BASE, len(base), True, False),
        (REFINER, pb.ARCHITECTURE_SDXL_REFINER, len(refiner), False, False),
    ]
    assert [m.sha256 for m in cache.models] == [payloads.sha256(base), payloads.sha256(refiner)]
    assert (cache.total_bytes, cache.quota_bytes) == (len(base) + len(refiner), QUOTA)

    deleted = service.stub.DeleteModel(pb.DeleteModelRequest(model=REFINER), timeout=TIMEOUT_S)

    assert deleted.freed_bytes == len(refiner)
    cache = listing(service.stub)
    assert [m.model for m in cache.models] == [BASE] and cache.total_bytes == len(base)
    assert [p.stat().st_size for p in blob_files(service.cache)] == [len(base)]
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.DeleteModel(pb.DeleteModelRequest(model=REFINER), timeout=TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == f"model: {REFINER} is not in the cache"


def test_pulling_a_local_model_streams_its_hashing_as_verifying_progress(service: Service, tmp_path: Path) -> None:
    local = another_base(service.store, tmp_path)
    size = sum(p.stat().st_size for p in Path(local.removeprefix("local:")).rglob("*") if p.is_file())

    responses = pull(service.stub, local)

    progress = [r.progress for r in responses if r.WhichOneof("event") == "progress"]
    assert progress and all(p.verifying for p in progress)  # hashed in place, nothing downloaded
    assert (progress[-1].bytes_done, progress[-1].bytes_total) == (size, size)
    assert responses[-1].model.model == local and responses[-1].model.size_bytes == size


def test_pin_and_unpin_a_cached_model(service: Service, civitai: FakeCivitai, storage: FakeStorage) -> None:
    add_pair(civitai)
    assert not pull(service.stub, BASE)[-1].model.pinned

    pinned = service.stub.PinModel(pb.PinModelRequest(model=BASE), timeout=TIMEOUT_S).model
    assert (pinned.model, pinned.pinned) == (BASE, True)
    assert [(m.model, m.pinned) for m in listing(service.stub).models] == [(BASE, True)]
    # Another spelling of the same model; unpinning keeps it cached, evictable again.
    unpinned = service.stub.UnpinModel(
        pb.UnpinModelRequest(model="urn:air:sdxl:checkpoint:civitai:101055@128078"), timeout=TIMEOUT_S
    ).model
    assert (unpinned.model, unpinned.pinned) == (BASE, False)
    assert [(m.model, m.pinned) for m in listing(service.stub).models] == [(BASE, False)]

    # Pinning never downloads: a model that is not cached is NOT_FOUND, and nothing is fetched.
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.PinModel(pb.PinModelRequest(model=REFINER), timeout=TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == f"model: {REFINER} is not in the cache"
    assert len(storage.gets()) == 1 and [m.model for m in listing(service.stub).models] == [BASE]


def test_a_model_in_use_is_not_deleted(service: Service, civitai: FakeCivitai) -> None:
    base, _ = add_pair(civitai)
    pull(service.stub, BASE)

    assert [m.in_use for m in listing(service.stub).models] == [False]
    with service.store.lease(BASE):  # what a job holds while it uses the model
        assert [m.in_use for m in listing(service.stub).models] == [True]
        with pytest.raises(grpc.RpcError) as caught:
            service.stub.DeleteModel(pb.DeleteModelRequest(model=BASE), timeout=TIMEOUT_S)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "in use" in caught.value.details()
        assert [m.model for m in listing(service.stub).models] == [BASE]

    assert service.stub.DeleteModel(pb.DeleteModelRequest(model=BASE), timeout=TIMEOUT_S).freed_bytes == len(base)


@pytest.mark.parametrize("rpc", ["PullModel", "DeleteModel", "PinModel", "UnpinModel"])
def test_a_malformed_model_is_an_invalid_argument_naming_the_field(service: Service, rpc: str) -> None:
    malformed = "civitai:101055@"
    with pytest.raises(grpc.RpcError) as caught:
        if rpc == "PullModel":
            pull(service.stub, malformed)
        elif rpc == "DeleteModel":
            service.stub.DeleteModel(pb.DeleteModelRequest(model=malformed), timeout=TIMEOUT_S)
        elif rpc == "PinModel":
            service.stub.PinModel(pb.PinModelRequest(model=malformed), timeout=TIMEOUT_S)
        else:
            service.stub.UnpinModel(pb.UnpinModelRequest(model=malformed), timeout=TIMEOUT_S)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["model"]
    assert "numeric version" in caught.value.details()


def test_civitai_refusing_the_token_is_unauthenticated_and_the_token_stays_secret(
    service: Service, civitai: FakeCivitai, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    add_pair(civitai)
    # civitai's own words, plus what a careless server might do: echo the credentials back.
    message = f"The creator of this asset requires you to be logged in (key {TOKEN} is not valid)"
    civitai.download_errors[128078] = (401, {"error": "Unauthorized", "message": message}, {})

    with pytest.raises(grpc.RpcError) as caught:
        pull(service.stub, BASE)

    err = caught.value
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "requires you to be logged in" in err.details() and "CIVITAI_TOKEN" in err.details()
    assert civitai.downloads()[0].headers["authorization"] == f"Bearer {TOKEN}"  # it was sent, to civitai only
    metadata = b"".join(v if isinstance(v, bytes) else v.encode() for _, v in err.trailing_metadata() or ())
    for text in (err.details(), metadata.decode("utf-8", "replace"), caplog.text):
        assert TOKEN not in text
    assert listing(service.stub).models == []


# ---- resident models ---------------------------------------------------------------------------------------


async def test_models_loaded_on_a_device_are_reported_and_kept(store: ModelStore, civitai: FakeCivitai) -> None:
    base, _ = add_pair(civitai)
    resident = {BASE}
    server = grpc.aio.server()
    service = ModelService(store, resident_models=lambda: resident)
    pb_grpc.add_ModelServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            pulled = [r async for r in stub.PullModel(pb.PullModelRequest(model=BASE), timeout=TIMEOUT_S)]
            assert pulled[-1].model.resident
            async for _ in stub.PullModel(pb.PullModelRequest(model=REFINER), timeout=TIMEOUT_S):
                pass

            cache = await stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT_S)
            assert [(m.model, m.resident) for m in cache.models] == [(BASE, True), (REFINER, False)]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.DeleteModel(pb.DeleteModelRequest(model=BASE), timeout=TIMEOUT_S)
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert caught.value.details() == f"model: {BASE} is loaded on a device and cannot be deleted now"
            assert store.lookup(BASE) is not None

            resident.clear()  # unloaded
            deleted = await stub.DeleteModel(pb.DeleteModelRequest(model=BASE), timeout=TIMEOUT_S)
            assert deleted.freed_bytes == len(base)
    finally:
        await server.stop(0)


def test_every_architecture_has_its_own_proto_value() -> None:
    assert set(ARCHITECTURES) == set(Architecture)
    values = list(ARCHITECTURES.values())
    assert len(set(values)) == len(values) and pb.ARCHITECTURE_UNSPECIFIED not in values
