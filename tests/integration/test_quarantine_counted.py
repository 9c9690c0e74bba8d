"""Quarantined blobs count (issue 21, item 10): they were outside the quota and the "on disk" figures (1.68 GB
on disk, 842.5 MB reported). Now `ListModels`' total, the CLI's "on disk" and the quota count them, and under
quota pressure they are removed before any model is evicted (they are kept a week only for an operator)."""

from __future__ import annotations

from pathlib import Path

import grpc

from modelstore import ModelStore, StoreSettings
from refinery.v1 import models_pb2, models_pb2_grpc
from tests.conftest import TINY_BASE

from .conftest import TIMEOUT_S, ServerThread, make_settings
from .test_damaged_models import UNET, copy_cache, flip_byte_at, in_the_unet, pixels


def test_a_quarantined_blob_counts_in_the_bytes_on_disk(
    tmp_path: Path, store_settings: StoreSettings, server: ServerThread
) -> None:
    del server  # the session's server has built the tiny models into the cache copied here
    cache = copy_cache(store_settings.cache_dir, tmp_path / "cache")
    settings = StoreSettings(cache_dir=cache, offline=True)
    store = ModelStore(settings)
    blob = (store.describe(TINY_BASE).path / UNET).resolve()
    flip_byte_at(blob, in_the_unet(blob))
    thread = ServerThread(make_settings(settings, pins=()), store=store)
    try:
        pixels(thread)  # the damaged blob is set aside and the model rebuilt
        assert (cache / "quarantine" / blob.name).is_file()
        with grpc.insecure_channel(thread.address) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            listing = stub.ListModels(models_pb2.ListModelsRequest(), timeout=TIMEOUT_S)
    finally:
        thread.close()
        store.close()
    on_disk = [p for folder in ("blobs", "quarantine") for p in (cache / folder).rglob("*") if p.is_file()]
    assert listing.total_bytes == sum(p.stat().st_size for p in on_disk)
