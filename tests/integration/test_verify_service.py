"""`ModelService.VerifyModel` through a real server: progress, then one result per model; an administrative
call."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from modelstore import ModelStore, StoreSettings
from refinery.v1 import models_pb2 as pb
from refinery.v1 import models_pb2_grpc as pb_grpc
from tests.fakes import payloads
from tests.fakes.cachefs import blob_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage

from .conftest import TIMEOUT_S, ServerThread, make_settings

BASE, REFINER = "civitai:1@2", "civitai:1@3"
ADMIN = "admin-token-0123456789abcdef"


def test_verify_streams_progress_then_a_result_per_model(
    tmp_path: Path, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    base, refiner = payloads.checkpoint("base", seed=1), payloads.checkpoint("refiner", seed=2)
    civitai.add_version(1, 2, [(FakeFile(4, "b"), base)])
    civitai.add_version(1, 3, [(FakeFile(5, "r"), refiner)], base_model_type="Refiner")
    store = ModelStore(StoreSettings(cache_dir=tmp_path / "cache", civitai_api=civitai.url))
    store.pull(BASE)
    store.pull(REFINER)
    damaged = store.settings.cache_dir / "blobs" / "sha256" / payloads.sha256(refiner)[:2] / payloads.sha256(refiner)
    damaged.chmod(0o644)
    damaged.write_bytes(refiner[:-1] + bytes([refiner[-1] ^ 1]))
    settings = make_settings(store.settings, pins=())
    thread = ServerThread(replace(settings, security=replace(settings.security, admin_token=ADMIN)), store=store)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.VerifyModel(pb.VerifyModelRequest(), timeout=TIMEOUT_S))
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED  # administration: the admin token
            admin = (("authorization", f"Bearer {ADMIN}"),)
            events = list(stub.VerifyModel(pb.VerifyModelRequest(), timeout=TIMEOUT_S, metadata=admin))
            with pytest.raises(grpc.RpcError) as missing:
                list(stub.VerifyModel(pb.VerifyModelRequest(model="civitai:9@9"), timeout=TIMEOUT_S, metadata=admin))
    finally:
        thread.close()
        store.close()

    results = [e.result for e in events if e.WhichOneof("event") == "result"]
    assert [(r.model, r.verdict, r.bytes_checked) for r in results] == [
        (BASE, pb.VerifyResult.VERDICT_INTACT, len(base)),
        (REFINER, pb.VerifyResult.VERDICT_REPAIRED, len(refiner)),
    ]
    assert results[1].message.startswith("model.safetensors does not match its SHA256")
    assert events[0].WhichOneof("event") == "progress" and events[0].progress.verifying
    assert {e.progress.model for e in events if e.WhichOneof("event") == "progress"} == {BASE, REFINER}
    assert [b.read_bytes() for b in blob_files(store.settings.cache_dir)] == sorted(
        [base, refiner], key=payloads.sha256
    )
    assert len(storage.gets()) == 3
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
