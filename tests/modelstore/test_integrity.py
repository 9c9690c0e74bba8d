"""Cached weights are what their names say (issue 13, finding 3): a blob changed on disk is caught before a
process uses it, set aside, and fetched again where the source allows; `verify` checks every SHA256."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from modelstore import DownloadProgress, Verdict
from modelstore.errors import IntegrityError, ModelNotFound
from tests.fakes import payloads
from tests.fakes.cachefs import blob_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage
from tests.modelstore.conftest import MakeStore

MODEL = "civitai:1@2"


@pytest.fixture
def data(civitai: FakeCivitai) -> bytes:
    checkpoint = payloads.checkpoint("base", seed=1)
    civitai.add_version(1, 2, [(FakeFile(3, "m.safetensors"), checkpoint)])
    return checkpoint


def flip_byte(path: Path, from_end: int = 10) -> None:
    """Flip one byte of the tensor data (the header stays well-formed: only a hash can tell)."""
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(-from_end, 2)
        byte = f.read(1)
        f.seek(-from_end, 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def quarantined(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "quarantine").glob("*"))


def test_a_flipped_byte_is_caught_set_aside_and_downloaded_again(
    make_store: MakeStore, storage: FakeStorage, data: bytes, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_store().pull(MODEL)
    (blob,) = blob_files(cache_dir)
    flip_byte(blob)
    caplog.set_level(logging.WARNING)

    record = make_store().resolve(MODEL)  # another process starting

    assert record.path.read_bytes() == data
    assert len(storage.gets()) == 2
    (aside,) = quarantined(cache_dir)
    assert aside.name == payloads.sha256(data) and aside.read_bytes() != data
    assert "model.safetensors changed since it entered the cache" in caplog.text
    assert "fetching it again" in caplog.text


def test_offline_a_damaged_model_is_refused_and_kept_for_a_later_pull(
    make_store: MakeStore, storage: FakeStorage, data: bytes, cache_dir: Path
) -> None:
    store = make_store()
    store.pull(MODEL)
    store.pin(MODEL)
    (blob,) = blob_files(cache_dir)
    flip_byte(blob)
    offline = make_store(offline=True)

    with pytest.raises(IntegrityError, match=r"model\.safetensors changed .*offline mode") as caught:
        offline.resolve(MODEL)

    assert caught.value.air == MODEL
    assert str(cache_dir) not in str(caught.value)  # no path on the server's disk in what a client reads
    assert offline.lookup(MODEL) is None and blob_files(cache_dir) == []
    assert [m.pinned for m in offline.list_models()] == [True]  # its row and pin stay...
    make_store().pull(MODEL)  # ...and a pull once the network is back brings it in again, still pinned
    assert [m.pinned for m in make_store().list_models()] == [True]
    assert blob_files(cache_dir)[0].read_bytes() == data and len(storage.gets()) == 2


def test_a_file_rewritten_while_the_process_runs_is_checked_again(
    make_store: MakeStore, storage: FakeStorage, data: bytes, cache_dir: Path
) -> None:
    store = make_store()
    store.resolve(MODEL)
    store.resolve(MODEL)
    assert len(storage.gets()) == 1
    (blob,) = blob_files(cache_dir)
    flip_byte(blob)

    assert store.resolve(MODEL).path.read_bytes() == data

    assert len(storage.gets()) == 2


def test_the_check_is_progress_once_per_process_and_pull_checks_again(make_store: MakeStore, data: bytes) -> None:
    make_store().pull(MODEL)
    store = make_store()
    seen: list[DownloadProgress] = []

    store.resolve(MODEL, progress=seen.append)
    first = list(seen)
    store.resolve(MODEL, progress=seen.append)
    second = seen[len(first) :]
    store.pull(MODEL, progress=seen.append)
    pulled = seen[len(first) + len(second) :]

    assert first and all(p.verifying for p in first) and first[-1].bytes_done == len(data)
    assert second == []  # checked already in this process, and the file has not changed
    assert pulled and pulled[-1].verifying and pulled[-1].bytes_done == len(data)


def test_a_blob_from_before_fast_digests_is_checked_by_its_sha256_once(
    make_store: MakeStore, data: bytes, cache_dir: Path
) -> None:
    make_store().pull(MODEL)
    with sqlite3.connect(cache_dir / "index.sqlite") as db:
        db.execute("DELETE FROM blob_digests")
    seen: list[DownloadProgress] = []

    make_store().resolve(MODEL, progress=seen.append)

    assert seen[-1].bytes_done == len(data)
    with sqlite3.connect(cache_dir / "index.sqlite") as db:
        ((sha256, size),) = db.execute("SELECT sha256, size FROM blob_digests").fetchall()
    assert (sha256, size) == (payloads.sha256(data), len(data))
    (blob,) = blob_files(cache_dir)
    with sqlite3.connect(cache_dir / "index.sqlite") as db:
        db.execute("DELETE FROM blob_digests")
    flip_byte(blob)
    with pytest.raises(IntegrityError, match="does not match its SHA256"):
        make_store(offline=True).resolve(MODEL)


def test_verify_reads_every_byte_and_repairs_what_it_can(
    make_store: MakeStore, storage: FakeStorage, data: bytes, cache_dir: Path, tmp_path: Path
) -> None:
    store = make_store()
    store.pull(MODEL)
    local = tmp_path / "local.safetensors"
    local.write_bytes(payloads.checkpoint("refiner", seed=2))
    store.pull(f"local:{local}")

    intact = list(store.verify())
    assert [(v.model, v.verdict, v.bytes_checked) for v in intact] == [
        (MODEL, Verdict.INTACT, len(data)),
        (f"local:{local}", Verdict.SKIPPED, 0),
    ]

    flip_byte(blob_files(cache_dir)[0])
    (offline,) = make_store(offline=True).verify([MODEL])
    assert offline.verdict is Verdict.CORRUPT and "does not match its SHA256" in offline.message
    assert "offline mode" in offline.message and len(storage.gets()) == 1

    (repaired,) = make_store().verify([MODEL])
    assert repaired.verdict is Verdict.REPAIRED and "failed its check earlier" in repaired.message
    assert blob_files(cache_dir)[0].read_bytes() == data and len(storage.gets()) == 2
    with pytest.raises(ModelNotFound):
        list(store.verify(["civitai:9@9"]))
