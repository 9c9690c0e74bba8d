"""Staging folders that killed processes leave under `<cache>/tmp/` are removed when a store opens the cache,
and never those another process is using at that moment (issue 13, finding 8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from modelstore import ModelStore, StoreSettings

TIMEOUT_S = 120
BUILTIN = "builtin:tiny-sdxl-base@1"


def _open(cache_dir: Path) -> None:
    ModelStore(StoreSettings(cache_dir=cache_dir, offline=True)).close()


def _holder(cache_dir: Path) -> tuple[subprocess.Popen[str], Path]:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.staging_child", str(cache_dir / "tmp")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def test_a_built_in_model_killed_while_building_leaves_nothing_after_the_next_start(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.pull_child", str(cache_dir), "http://127.0.0.1:9", BUILTIN],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not list((cache_dir / "tmp").glob("builtin-*/model")):
        assert child.poll() is None, "the build finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(TIMEOUT_S)
    assert list((cache_dir / "tmp").glob("builtin-*"))  # what the kill left behind

    _open(cache_dir)

    assert list((cache_dir / "tmp").iterdir()) == []


def test_a_folder_another_process_works_in_is_left_alone(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    child, folder = _holder(cache_dir)
    try:
        _open(cache_dir)
        assert (folder / "model" / "weights.safetensors").is_file()
    finally:
        child.communicate("done\n", timeout=TIMEOUT_S)
    assert child.returncode == 0 and not folder.exists()  # its owner removed it when done


def test_a_folder_whose_owner_was_killed_is_removed(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    child, folder = _holder(cache_dir)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=TIMEOUT_S)  # waits, and closes the pipes
    assert folder.is_dir()

    _open(cache_dir)

    assert not folder.exists()


def test_leftovers_of_earlier_versions_go_once_they_are_old(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _open(cache_dir)
    old, new = cache_dir / "tmp" / "builtin-old", cache_dir / "tmp" / "snapshot-new"
    (old / "model").mkdir(parents=True)
    new.mkdir()  # could be a folder another process created an instant ago and is about to lock
    memo = cache_dir / "components" / f"{'ab' * 32}.1234.tmp"
    memo.parent.mkdir(exist_ok=True)
    memo.write_text("[]")
    two_hours_ago = time.time() - 7200
    for path in (old, memo):
        os.utime(path, (two_hours_ago, two_hours_ago))

    _open(cache_dir)

    assert not old.exists() and not memo.exists()
    assert new.is_dir()
