"""A read-only model cache (issue 20): a volume filled once, then mounted read-only by every replica.

The store on it serves every model the volume holds and writes nothing: no file, index row, lock or lease,
not even a last-used time. What would need a write (a missing model, a pull of one, a delete, a pin, a repair)
is ReadOnlyCache, FAILED_PRECONDITION at the gRPC edge.

"Nothing written" is proven three ways: in this process an audit hook records every write the store asks the
OS for (open for writing, mkdir, rename, unlink, chmod, utime) under the cache, and the whole tree (names,
sizes, modes, modification times) is compared before and after; a real `refinery serve --cache-read-only`
runs with the cache bind-mounted read-only (`deploy/local/read_only.py`), where the kernel refuses any write.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from deploy.local import read_only
from deploy.local.fleet import free_ports
from deploy.local.replica import Replica, ReplicaSpec
from modelstore import ModelStore, StoreSettings, Verdict
from modelstore.errors import DownloadRefused, ReadOnlyCache
from refinery.client import Client, Image, RefineryError

BASE, REFINER, MISSING = "builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-refiner@1", "builtin:tiny-sdxl-base@2"
ADMIN_TOKEN = "read-only-cache-test-admin-token"

_WRITES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.utime", "os.truncate", "os.link"}
_watched: list[Path] = []
_seen: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watched or not args:
        return
    if event == "open":
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        writes = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) or any(c in mode for c in "wax+")
    else:
        writes = event in _WRITES or event == "sqlite3.connect"
    if writes and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.startswith(str(w)) for w in _watched) and not (event == "sqlite3.connect" and "mode=ro" in path):
            _seen.append(f"{event} {path}")


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while `_watched` is set


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` with its size, mode and modification time (links not followed)."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_size, st.st_mode, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache filled as the pull Job fills the shared volume: both tiny models pulled and measured."""
    cache = tmp_path_factory.mktemp("shared") / "cache"
    store = ModelStore(StoreSettings(cache_dir=cache))
    try:
        for model in (BASE, REFINER):
            store.components(store.pull(model))
    finally:
        store.close()
    assert not (cache / "index.sqlite-wal").exists()  # the last connection checkpointed it
    return cache


@pytest.fixture
def copy(filled: Path, tmp_path: Path) -> Path:
    """A copy of the filled cache for a test that changes it (the model folders link into blobs relatively)."""
    shutil.copytree(filled, tmp_path / "cache", symlinks=True)
    return tmp_path / "cache"


@pytest.fixture
def audited() -> Iterator[list[str]]:
    _seen.clear()
    yield _seen


def _store(cache: Path) -> ModelStore:
    return ModelStore(StoreSettings(cache_dir=cache, read_only=True))


def _watching(cache: Path) -> None:
    _watched[:] = [cache]


def test_it_serves_every_model_and_writes_nothing(filled: Path, audited: list[str]) -> None:
    before = tree(filled)
    _watching(filled)
    try:
        store = _store(filled)
        with store.lease(BASE):
            record = store.resolve(BASE)
            assert record.path.is_dir() and store.components(record)
        assert store.pull(REFINER).canonical == REFINER  # held already: its record, nothing fetched
        assert store.lookup(BASE) is not None
        listed = {m.air: m for m in store.list_models()}
        assert set(listed) == {BASE, REFINER} and store.used_bytes() > 0
        assert listed[BASE].last_used > listed[REFINER].added  # kept in memory
        assert [v.verdict for v in store.verify()] == [Verdict.INTACT, Verdict.INTACT]
        store.close()
    finally:
        _watched.clear()
    assert audited == []
    assert tree(filled) == before


def test_the_audit_sees_a_writable_store_write(copy: Path, audited: list[str]) -> None:
    _watching(copy)
    try:
        store = ModelStore(StoreSettings(cache_dir=copy))
        with store.lease(BASE):
            store.resolve(BASE)
        store.close()
    finally:
        _watched.clear()
    assert any(event.startswith(("open", "sqlite3.connect")) for event in audited), audited


def test_what_needs_a_write_is_refused(filled: Path, audited: list[str]) -> None:
    before = tree(filled)
    _watching(filled)
    try:
        store = _store(filled)
        with pytest.raises(ReadOnlyCache, match="not in the read-only model cache; pull it into the shared volume"):
            store.resolve(MISSING)
        with pytest.raises(ReadOnlyCache) as pulled:
            store.pull(MISSING)
        assert isinstance(pulled.value, DownloadRefused) and pulled.value.air == MISSING  # FAILED_PRECONDITION
        with pytest.raises(ReadOnlyCache, match="deleting"):
            store.delete(BASE)
        with pytest.raises(ReadOnlyCache, match="read-only"):
            store.pin(BASE)
        assert store.lookup(MISSING) is None
        store.close()
    finally:
        _watched.clear()
    assert audited == []
    assert tree(filled) == before


def test_a_damaged_file_is_reported_and_left_where_it_is(copy: Path, audited: list[str]) -> None:
    blob = max((p for p in (copy / "blobs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(blob.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = tree(copy)
    _watching(copy)
    try:
        store = _store(copy)
        damaged = [m for m in (BASE, REFINER) if store.lookup(m) is None]
        assert damaged, "the flipped byte must belong to a model"
        with pytest.raises(ReadOnlyCache, match="cannot be set aside or fetched again here"):
            store.resolve(damaged[0])
        (result,) = store.verify([damaged[0]])
        assert result.verdict is Verdict.CORRUPT and "read-only" in result.message
        store.close()
    finally:
        _watched.clear()
    assert audited == []
    assert tree(copy) == before  # nothing quarantined


def test_commits_left_in_a_write_ahead_log_are_read(copy: Path) -> None:
    # A writer that stopped before checkpointing (a pull Job killed at the end) leaves its commits in the -wal.
    writer = sqlite3.connect(copy / "index.sqlite", isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("UPDATE models SET pinned = 1 WHERE air = ?", (BASE,))
    try:
        assert (copy / "index.sqlite-wal").stat().st_size > 0
        before = tree(copy)
        store = _store(copy)
        assert store.describe(BASE).pinned  # immutable alone would read the main file and miss it
        store.close()
        assert tree(copy) == before
    finally:
        writer.close()


def test_an_empty_volume_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ReadOnlyCache, match="must be filled first"):
        _store(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


@pytest.mark.skipif(not read_only.available(), reason="no unprivileged read-only bind mount here (unshare)")
def test_a_server_on_a_read_only_mount_serves_the_pair(filled: Path, tmp_path: Path) -> None:
    before = tree(filled)
    port, metrics_port = free_ports("127.0.0.1", 2)
    spec = ReplicaSpec(
        "read-only", "127.0.0.1", port, metrics_port, filled, tmp_path / "serve.log",
        env={"REFINERY_ADMIN_TOKEN": ADMIN_TOKEN}, pins=f"{BASE}+{REFINER}", cache_read_only=True,
        prefix=read_only.read_only_prefix(filled),
    )  # fmt: skip
    replica = Replica(spec)
    replica.start()
    try:
        replica.wait_ready(120)
        with Client(replica.address, admin_token=ADMIN_TOKEN, resend=None) as client:
            events = list(client.generate("a lighthouse", steps=4, width=64, height=64, timeout=60))
            assert any(isinstance(e, Image) for e in events)
            with pytest.raises(RefineryError) as missing:
                list(client.generate("a lighthouse", model=MISSING, steps=4, timeout=60))
            assert missing.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "not in the read-only model cache" in missing.value.message
            for refused in (lambda: client.delete_model(BASE), lambda: list(client.pull_model(MISSING))):
                with pytest.raises(RefineryError) as admin:
                    refused()
                assert admin.value.code == grpc.StatusCode.FAILED_PRECONDITION, admin.value.message
            assert {m.model for m in client.list_models().models} >= {BASE, REFINER}
        assert replica.total("refinery_downloads_total") == 0
    finally:
        replica.stop()
    assert replica.wait() == 0, replica.log_tail(20)
    assert tree(filled) == before
