"""The cache: quota and LRU eviction, pins and leases, delete, local and built-in models, the index."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import requests

from modelstore import Architecture, Layout, ModelStore
from modelstore.errors import DiskFull, ModelInUse, ModelNotFound, QuotaExceeded, SourceUnavailable, UnsafeCheckpoint
from tests.conftest import TINY_BASE
from tests.fakes import payloads
from tests.fakes.cachefs import blob_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage
from tests.modelstore.conftest import MakeStore

SIZE = 400_000  # each test model is a little over this


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


def three_models(civitai: FakeCivitai) -> list[str]:
    for n in (1, 2, 3):
        civitai.add_version(
            n,
            n * 10,
            [(FakeFile(n * 100, f"m{n}.safetensors"), payloads.checkpoint(seed=n, extra_bytes=SIZE))],
        )
    return ["civitai:1@10", "civitai:2@20", "civitai:3@30"]


def cached(store: ModelStore) -> list[str]:
    return sorted(m.air for m in store.list_models())


def test_least_recently_used_is_evicted_to_make_room(
    make_store: MakeStore, civitai: FakeCivitai, cache_dir: Path
) -> None:
    a, b, c = three_models(civitai)
    store = make_store(max_bytes=int(2.5 * SIZE))  # room for two
    store.resolve(a)
    store.resolve(b)
    store.resolve(a)  # a is now the more recently used

    store.resolve(c)

    assert cached(store) == [a, c]
    assert store.lookup(b) is None and len(blob_files(cache_dir)) == 2


def test_pinned_and_in_use_models_are_never_evicted(make_store: MakeStore, civitai: FakeCivitai) -> None:
    a, b, c = three_models(civitai)
    store = make_store(max_bytes=int(2.5 * SIZE))
    store.resolve(a)
    store.resolve(b)
    store.pin(a)  # a is the least recently used, but pinned
    store.resolve(c)
    assert cached(store) == [a, c]

    store.pin(a, False)
    with store.lease(c):  # now a is evictable and c in use: b's return evicts a
        store.resolve(b)
    assert cached(store) == [b, c]


def test_a_model_that_cannot_fit_is_refused_before_any_byte(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    a, b, c = three_models(civitai)
    store = make_store(max_bytes=int(2.5 * SIZE))
    store.resolve(a)
    store.resolve(b)
    store.pin(a)
    downloads_before = (len(civitai.downloads()), len(storage.gets()))
    with store.lease(b), pytest.raises(QuotaExceeded, match="pinned, in use"):
        store.resolve(c)  # everything else is pinned or in use
    with pytest.raises(QuotaExceeded, match="quota"):
        make_store(max_bytes=SIZE // 2).resolve(c)  # bigger than the whole quota
    assert (len(civitai.downloads()), len(storage.gets())) == downloads_before
    assert cached(store) == [a, b]


def test_too_little_free_disk_is_refused_before_any_byte(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _, _ = three_models(civitai)
    store = make_store()
    full_disk = DiskUsage(10**12, 10**12 - 1000, 1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: full_disk)
    with pytest.raises(DiskFull, match=r"the disk holding the model cache has 1(\.0)? kB free"):  # retryable
        store.resolve(a)
    assert civitai.downloads() == [] and storage.gets() == []


def test_delete_refuses_models_in_use_and_keeps_shared_files(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    a, _, _ = three_models(civitai)
    pinned_file = f"{a}+100"  # the same file, named with its file id: one blob for both
    store = make_store()
    record = store.resolve(a)
    store.resolve(pinned_file)
    assert len(storage.gets()) == 1 and len(blob_files(cache_dir)) == 1

    with store.lease(record), pytest.raises(ModelInUse):
        store.delete(a)
    store.delete(a)

    assert cached(store) == [pinned_file] and not record.path.exists()
    assert store.resolve(pinned_file).path.read_bytes() == payloads.checkpoint(seed=1, extra_bytes=SIZE)
    store.delete(pinned_file)
    assert blob_files(cache_dir) == [] and cached(store) == []
    with pytest.raises(ModelNotFound):
        store.delete(a)


def test_delete_reports_the_bytes_it_freed(make_store: MakeStore, civitai: FakeCivitai, cache_dir: Path) -> None:
    a, b, _ = three_models(civitai)
    shared = f"{a}+100"  # the same file as a: one blob for both
    store = make_store()
    for model in (a, shared, b):
        store.resolve(model)
    size_a, size_b = (len(payloads.checkpoint(seed=n, extra_bytes=SIZE)) for n in (1, 2))
    assert store.used_bytes() == size_a + size_b == sum(p.stat().st_size for p in blob_files(cache_dir))

    assert store.delete(a) == 0  # its file stays for the other name
    assert store.used_bytes() == size_a + size_b
    assert store.delete(shared) == size_a
    assert store.delete(b) == size_b
    assert store.used_bytes() == 0 and blob_files(cache_dir) == []


def test_list_models_describes_the_cache(make_store: MakeStore, civitai: FakeCivitai) -> None:
    a, b, _ = three_models(civitai)
    store = make_store()
    store.resolve(a)
    store.resolve(b)
    store.pin(b)
    with store.lease(a):
        listing = {m.air: m for m in store.list_models()}
    assert listing[a].in_use and not listing[a].pinned
    assert listing[b].pinned and not listing[b].in_use
    assert listing[a].size_bytes == len(payloads.checkpoint(seed=1, extra_bytes=SIZE))
    assert listing[a].architecture is Architecture.UNKNOWN and listing[a].layout is Layout.SINGLE_FILE
    assert listing[a].last_used <= listing[b].last_used
    assert listing[a].sha256 == payloads.sha256(payloads.checkpoint(seed=1, extra_bytes=SIZE))
    assert store.describe(b) == listing[b]
    with pytest.raises(ModelNotFound):
        store.describe("civitai:9@90")


def test_the_cache_works_with_the_sources_gone(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    a, b, _ = three_models(civitai)
    session = requests.Session()
    store = make_store(session=session)
    record = store.resolve(a)
    civitai.close()
    storage.close()
    # A server that goes away closes its connections; the fakes go on serving those already open, so the
    # session's pooled ones are dropped as the server would have dropped them.
    session.close()
    assert store.lookup(a) == record and store.resolve(a) == record
    assert store.lookup(b) is None  # lookup never asks the network
    with pytest.raises(SourceUnavailable):
        store.resolve(b)


def test_a_blob_left_by_a_crash_before_the_index_commit_is_reused(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    a, _, _ = three_models(civitai)
    data = payloads.checkpoint(seed=1, extra_bytes=SIZE)
    store = make_store()
    blob = cache_dir / "blobs" / "sha256" / payloads.sha256(data)[:2] / payloads.sha256(data)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)  # verified and renamed in, then the process died before recording the model

    assert store.resolve(a).path.read_bytes() == data
    assert civitai.downloads() == [] and storage.gets() == []


def test_a_local_file_is_registered_by_reference(make_store: MakeStore, tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "my-refiner.safetensors"
    path.write_bytes(payloads.checkpoint("refiner", seed=4))
    store = make_store()

    record = store.resolve(f"local:{path}")

    assert record.path == path and record.architecture is Architecture.SDXL_REFINER
    assert blob_files(cache_dir) == []  # not copied
    assert store.resolve(str(path)) == record  # a bare absolute path is the same model
    path.write_bytes(payloads.checkpoint("base", seed=5))
    changed = store.resolve(str(path))
    assert changed.architecture is Architecture.SDXL_BASE and changed.sha256 != record.sha256
    store.delete(str(path))
    assert path.exists() and cached(store) == []


def test_a_local_pickle_is_refused(make_store: MakeStore, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(payloads.pickle_checkpoint())
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        make_store().resolve(str(path))
    with pytest.raises(ModelNotFound):
        make_store().resolve(str(tmp_path / "missing"))


def test_a_builtin_model_is_cached_and_loads_from_its_folder(model_store: ModelStore) -> None:
    from modelstore.loading import load_pipeline

    record = model_store.resolve(TINY_BASE)

    listing = {m.air: m for m in model_store.list_models()}
    assert listing[TINY_BASE].architecture is Architecture.SDXL_BASE
    assert (record.path / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()
    pipeline = load_pipeline(record, role="base", device="cpu", dtype=None)
    assert pipeline.unet.config.addition_embed_type == "text_time"
    assert model_store.resolve(TINY_BASE) == record
    # The same folder registered as a local model is recognised the same way.
    local = model_store.resolve(f"local:{record.path}")
    assert (local.layout, local.architecture, local.sha256) == (
        Layout.DIFFUSERS,
        Architecture.SDXL_BASE,
        record.sha256,
    )
    model_store.delete(f"local:{record.path}")
    assert model_store.resolve(TINY_BASE).path.is_dir()  # forgetting the local model removed none of its files


def test_a_model_another_process_uses_is_neither_evicted_nor_deleted(
    make_store: MakeStore, civitai: FakeCivitai
) -> None:
    # Two stores over one folder share nothing but the file system, as two server processes do.
    a, b, c = three_models(civitai)
    serving, other = make_store(max_bytes=int(2.5 * SIZE)), make_store(max_bytes=int(2.5 * SIZE))
    serving.resolve(a)
    serving.resolve(b)  # a is the least recently used

    with serving.lease(a):  # loaded for a job in the serving process
        assert other.describe(a).in_use and not other.describe(b).in_use
        with pytest.raises(ModelInUse):
            other.delete(a)
        other.resolve(c)  # needs room: takes it from b, not from a
        assert cached(other) == [a, c]

    assert not other.describe(a).in_use
    assert other.delete(a) > 0


def test_a_process_that_dies_holds_no_lease(make_store: MakeStore, civitai: FakeCivitai, cache_dir: Path) -> None:
    a, _, _ = three_models(civitai)
    store = make_store()
    store.resolve(a)
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_LEASE, str(cache_dir), a],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            assert store.describe(a).in_use
            with pytest.raises(ModelInUse):
                store.delete(a)
        finally:
            holder.kill()  # SIGKILL: no clean-up code runs
    assert not store.describe(a).in_use  # the kernel dropped the dead process's lock
    assert store.delete(a) > 0


ROOT = Path(__file__).resolve().parents[2]
_HOLD_A_LEASE = """
import sys, time
from pathlib import Path
from modelstore import ModelStore, StoreSettings
store = ModelStore(StoreSettings(cache_dir=Path(sys.argv[1])))
store.acquire(sys.argv[2])
print("held", flush=True)
time.sleep(60)
"""
