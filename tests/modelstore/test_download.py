"""Resumable, single-flight downloads: kill -9 and restart, many waiters, two processes on one cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelstore import ModelRecord, ModelStore
from modelstore.errors import DownloadAbandoned
from modelstore.progress import DownloadProgress
from tests.fakes import payloads
from tests.fakes.cachefs import partial_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage, StoredObject
from tests.modelstore.conftest import MakeStore

MODEL = "civitai:1@2"
ROOT = Path(__file__).resolve().parents[2]
_DEADLINE_S = 60.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll until `condition` holds; fail (not time) the test if it never does."""
    deadline = time.monotonic() + _DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def serve_model(civitai: FakeCivitai, size: int = 3_000_000) -> tuple[bytes, StoredObject]:
    data = payloads.checkpoint(seed=21, extra_bytes=size)
    civitai.add_version(1, 2, [(FakeFile(3, "m.safetensors"), data)])
    return data, civitai.object_of(2, 3)


def child(cache_dir: Path, civitai: FakeCivitai) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.pull_child", str(cache_dir), civitai.url, MODEL],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def partial_size(cache_dir: Path) -> int:
    files = partial_files(cache_dir)
    return files[0].stat().st_size if files else 0


def test_a_download_killed_mid_way_resumes_after_restart(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    data, obj = serve_model(civitai)
    obj.hold_after = 1_000_000  # the link stalls after 1 MB: the process is killed while it waits
    with child(cache_dir, civitai) as process:
        wait_for(lambda: partial_size(cache_dir) >= 1_000_000, "the child to write 1 MB")
        process.send_signal(signal.SIGKILL)
        process.communicate()
    kept = partial_size(cache_dir)
    assert 0 < kept < len(data)

    obj.release.set()
    record = make_store().resolve(MODEL)  # "after a restart": a new store, same cache folder

    assert record.path.read_bytes() == data
    assert storage.gets()[-1].headers["range"] == f"bytes={kept}-"
    assert len(storage.gets()) == 2 and partial_files(cache_dir) == []


def test_concurrent_requests_share_one_download(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    data, obj = serve_model(civitai)
    obj.hold_after = 200_000
    store = make_store()
    waiters = 8
    events: list[list[DownloadProgress]] = [[] for _ in range(waiters)]
    records = [None] * waiters

    def request(i: int) -> None:
        records[i] = store.resolve(MODEL, progress=events[i].append)  # type: ignore[call-overload]

    threads = [threading.Thread(target=request, args=(i,)) for i in range(waiters)]
    for thread in threads:
        thread.start()
    # Every request has joined the flight (each has heard of it) before the bytes are let through.
    wait_for(lambda: all(events), "every request to receive progress")
    obj.release.set()
    for thread in threads:
        thread.join()

    assert len(storage.gets()) == 1 and len(civitai.downloads()) == 1
    assert all(r == records[0] for r in records) and records[0] is not None
    for seen in events:
        assert seen[-1].finished and seen[-1].bytes_done == seen[-1].bytes_total == len(data)


def test_two_processes_sharing_a_cache_download_once(
    civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    data, obj = serve_model(civitai)
    obj.hold_after = 200_000
    first = child(cache_dir, civitai)
    wait_for(lambda: partial_size(cache_dir) >= 200_000, "the first process to start downloading")
    second = child(cache_dir, civitai)
    # The second has asked civitai about the model, so it is on its way to the file while the first holds it.
    wait_for(lambda: len(civitai.seen("GET", "/api/v1/model-versions/")) == 2, "the second process to start")
    obj.release.set()
    outputs = [process.communicate(timeout=_DEADLINE_S) for process in (first, second)]

    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    results = [json.loads(stdout) for stdout, _ in outputs]
    assert results[0] == results[1] and Path(results[0]["path"]).read_bytes() == data
    assert len(storage.gets()) == 1 and len(civitai.downloads()) == 1


def test_a_server_that_ignores_range_gets_the_file_again_from_zero(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    data, obj = serve_model(civitai)
    obj.cut_at, obj.cut_times, obj.ignore_range = 1_000_000, 1, True
    events: list[DownloadProgress] = []

    assert make_store().resolve(MODEL, progress=events.append).path.read_bytes() == data
    assert [r.headers.get("range") for r in storage.gets()] == [None, "bytes=1000000-"]
    assert events[-1].bytes_done == len(data)  # the restart did not count bytes twice


def test_a_corrupt_partial_file_is_discarded_and_downloaded_again(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    data, _ = serve_model(civitai)
    store = make_store()
    # What a power cut can leave: a partial file whose bytes are not the file's.
    (cache_dir / "partial" / f"{payloads.sha256(data)}.part").write_bytes(os.urandom(500_000))
    events: list[DownloadProgress] = []

    assert store.resolve(MODEL, progress=events.append).path.read_bytes() == data
    assert [r.headers.get("range") for r in storage.gets()] == ["bytes=500000-", None]
    assert events[-1].bytes_done == len(data)


def test_a_store_waiting_on_another_process_sees_its_progress(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    # Two stores over one folder coordinate only through the file system, as two processes do.
    data, obj = serve_model(civitai)
    obj.hold_after = 1_000_000
    downloading, waiting = make_store(), make_store()
    first = threading.Thread(target=downloading.resolve, args=(MODEL,))
    first.start()
    wait_for(lambda: partial_size(cache_dir) >= 1_000_000, "the first store to write 1 MB")
    events: list[DownloadProgress] = []
    second = threading.Thread(target=waiting.resolve, args=(MODEL,), kwargs={"progress": events.append})
    second.start()
    wait_for(lambda: any(e.bytes_done >= 1_000_000 for e in events), "the waiting store to see the bytes")
    obj.release.set()
    first.join()
    second.join()

    assert len(storage.gets()) == 1
    assert events[-1].finished and events[-1].bytes_done == len(data)
    assert waiting.lookup(MODEL) == downloading.lookup(MODEL)


def test_a_large_file_cut_off_the_block_grid_resumes_and_verifies(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    # Several of the hasher's 4 MB read-back blocks, a cut that is not on their grid, and a resumed second
    # half: the store accepts the file only if its SHA256 over every byte, once each, is the published one.
    data, obj = serve_model(civitai, size=13_000_000)
    obj.cut_at, obj.cut_times = 5_000_003, 1

    record = make_store().resolve(MODEL)

    assert record.path.read_bytes() == data and record.sha256 == payloads.sha256(data)
    assert [r.headers.get("range") for r in storage.gets()] == [None, "bytes=5000003-"]


class Caller(threading.Thread):
    """One `resolve` on its own thread, as a request's resolver runs it; keeps what it returned or raised."""

    def __init__(self, store: ModelStore, give_up: threading.Event | None = None) -> None:
        super().__init__()
        self.store, self.give_up = store, give_up
        self.events: list[DownloadProgress] = []
        self.record: ModelRecord | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.record = self.store.resolve(MODEL, progress=self.events.append, give_up=self.give_up)
        except BaseException as exc:
            self.error = exc

    def result(self) -> Caller:
        self.join(_DEADLINE_S)
        assert not self.is_alive(), "resolve never returned"
        return self


def test_a_download_everyone_gave_up_on_stops_and_the_next_request_resumes_it(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    data, obj = serve_model(civitai, size=8_000_000)
    obj.hold_after = 1_000_000
    store = make_store()
    give_up = threading.Event()
    caller = Caller(store, give_up)
    wait_for(lambda: partial_size(cache_dir) >= 1_000_000, "the download to write 1 MB")

    give_up.set()  # the request was cancelled
    obj.release.set()

    assert isinstance(caller.result().error, DownloadAbandoned)
    kept = partial_size(cache_dir)
    assert 1_000_000 <= kept < len(data)  # stopped part-way, and what arrived is kept
    assert store.lookup(MODEL) is None

    assert store.resolve(MODEL).path.read_bytes() == data
    assert storage.gets()[-1].headers["range"] == f"bytes={kept}-"


def test_a_download_goes_on_while_another_request_still_waits_for_it(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    data, obj = serve_model(civitai, size=8_000_000)
    obj.hold_after = 1_000_000
    store = make_store()
    give_up = threading.Event()
    first = Caller(store, give_up)  # it started the download
    wait_for(lambda: partial_size(cache_dir) >= 1_000_000, "the download to write 1 MB")
    second = Caller(store)
    wait_for(lambda: bool(second.events), "the second request to join the download")

    give_up.set()
    obj.release.set()

    assert second.result().error is None and second.record is not None
    assert second.record.path.read_bytes() == data
    assert len(storage.gets()) == 1  # one transfer, never interrupted
    assert first.result().record == second.record


def test_a_request_that_gives_up_waiting_hears_so_at_once(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    data, obj = serve_model(civitai, size=8_000_000)
    obj.hold_after = 1_000_000
    store = make_store()
    first = Caller(store)
    wait_for(lambda: partial_size(cache_dir) >= 1_000_000, "the download to write 1 MB")
    give_up = threading.Event()
    second = Caller(store, give_up)
    wait_for(lambda: bool(second.events), "the second request to join the download")

    give_up.set()
    # While the link is still held: the request that left does not wait for the download to end.
    assert isinstance(second.result().error, DownloadAbandoned)
    obj.release.set()
    assert first.result().error is None and first.record is not None
    assert first.record.path.read_bytes() == data and len(storage.gets()) == 1
