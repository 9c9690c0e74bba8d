"""`refinery models pull|list|rm` as an operator runs them: a real process, the fake civitai API and storage host,
a real cache folder; and against a running server."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelstore import ModelStore, StoreSettings
from modelstore.units import format_bytes
from refinery.client import PullProgress
from server.cli.terminal import PullView
from tests.conftest import CIVITAI_TOKEN
from tests.fakes import payloads
from tests.fakes.cachefs import blob_files, partial_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage

from .conftest import ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # a hang fails the test; never an expectation about speed
TOKEN = CIVITAI_TOKEN
BASE = "civitai:101055@128078"


@pytest.fixture
def base(civitai: FakeCivitai) -> bytes:
    data = payloads.checkpoint("base", seed=1, extra_bytes=2_000_000)
    vae = payloads.checkpoint("plain", seed=3)
    civitai.add_version(
        101055,
        128078,
        [(FakeFile(126001, "sdxl_vae.safetensors", type="VAE", primary=True), vae), (FakeFile(126002, "b"), data)],
    )
    return data


def refinery(*args: str, cache: Path, civitai: FakeCivitai, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REFINERY_CACHE_DIR": str(cache),
        "REFINERY_CIVITAI_API": civitai.url,
        **env,
    }
    environment.pop("REFINERY_SERVER", None)
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "models", *args],
        cwd=cache.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def test_pull_list_rm_on_the_local_cache(
    tmp_path: Path, civitai: FakeCivitai, storage: FakeStorage, base: bytes
) -> None:
    cache = tmp_path / "cache"
    size = f"{len(base) / 1e6:.1f} MB"

    pulled = refinery("pull", "urn:air:sdxl:checkpoint:civitai:101055@128078", "--pin", cache=cache, civitai=civitai)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout == f"pulled {BASE} (SDXL base, {size}, pinned)\n"
    assert f"{size} downloaded" in pulled.stderr  # not a terminal: one line once done, no bar
    again = refinery("pull", BASE, cache=cache, civitai=civitai)
    assert again.returncode == 0 and again.stdout.startswith(f"pulled {BASE} ")
    assert again.stderr.startswith(f"{BASE}: {size} verified (")  # a cached model's files are checked again
    assert len(storage.gets()) == 1

    listed = refinery("list", cache=cache, civitai=civitai)
    assert listed.returncode == 0, listed.stderr
    header, row, total = listed.stdout.splitlines()
    assert header.split() == [
        "MODEL",
        "KIND",
        "ARCHITECTURE",
        "SIZE",
        "LAST",
        "USED",
        "(UTC)",
        "PINNED",
        "RESIDENT",
        "IN",
        "USE",
    ]
    assert row.split()[:5] == [BASE, "checkpoint", "SDXL", "base", size.split()[0]]
    assert row.split()[-3:] == ["yes", "no", "no"]
    assert total == f"1 model, {size} on disk (no quota)"

    unpinned = refinery("unpin", BASE, cache=cache, civitai=civitai)
    assert (unpinned.returncode, unpinned.stdout) == (0, f"unpinned {BASE} ({size})\n"), unpinned.stderr
    assert refinery("list", cache=cache, civitai=civitai).stdout.splitlines()[1].split()[-3:] == ["no", "no", "no"]
    pinned = refinery("pin", BASE, cache=cache, civitai=civitai)
    assert (pinned.returncode, pinned.stdout) == (0, f"pinned {BASE} ({size})\n"), pinned.stderr

    removed = refinery("rm", BASE, cache=cache, civitai=civitai)
    assert (removed.returncode, removed.stdout) == (0, f"deleted {BASE} ({size} freed)\n")
    assert blob_files(cache) == []
    assert (
        refinery("list", cache=cache, civitai=civitai).stdout
        == "no models in the cache\n0 models, 0 B on disk (no quota)\n"
    )

    missing = refinery("rm", BASE, cache=cache, civitai=civitai)
    assert missing.returncode == 1
    assert missing.stderr == f"error: NOT_FOUND: model: {BASE} is not in the cache\n"
    malformed = refinery("pull", "civitai:101055@", cache=cache, civitai=civitai)
    assert malformed.returncode == 2
    assert malformed.stderr.startswith("error: INVALID_ARGUMENT: model: ") and "numeric version" in malformed.stderr


def test_a_refused_download_is_one_line_without_the_token(tmp_path: Path, civitai: FakeCivitai, base: bytes) -> None:
    civitai.require_auth.add(128078)
    wrong = "civitai-cli-token-that-civitai-refuses"

    result = refinery("pull", BASE, cache=tmp_path / "cache", civitai=civitai, CIVITAI_TOKEN=wrong)

    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: UNAUTHENTICATED: model: ") and "requires you to be logged in" in line
    assert civitai.downloads()[0].headers["authorization"] == f"Bearer {wrong}"
    assert wrong not in result.stderr


def test_models_through_a_running_server(tmp_path: Path, civitai: FakeCivitai, base: bytes) -> None:
    server_cache = tmp_path / "server-cache"
    store = ModelStore(StoreSettings(cache_dir=server_cache, civitai_api=civitai.url, max_bytes=10**9))
    thread = ServerThread(make_settings(store.settings, pins=()), store=store)
    local = tmp_path / "local-cache"
    try:
        pulled = refinery("pull", BASE, "--server", thread.address, cache=local, civitai=civitai)
        listed = refinery("list", "--server", thread.address, cache=local, civitai=civitai)
    finally:
        thread.close()
        store.close()

    assert pulled.returncode == 0, pulled.stderr
    assert BASE in listed.stdout.splitlines()[1]
    assert listed.stdout.splitlines()[-1] == f"1 model, {len(base) / 1e6:.1f} MB on disk of a 1.0 GB quota"
    # The server's cache holds it; the CLI's own cache was never touched.
    assert [p.stat().st_size for p in blob_files(server_cache)] == [len(base)]
    assert not local.exists() or blob_files(local) == []


def test_the_bar_on_a_terminal_shows_bytes_and_rate() -> None:
    out = io.StringIO()
    view = PullView(BASE, out, interactive=True)
    view.show(PullProgress(BASE, bytes_done=0, bytes_total=6_900_000_000, bytes_per_second=0))
    view.show(PullProgress(BASE, bytes_done=3_450_000_000, bytes_total=6_900_000_000, bytes_per_second=85_300_000))
    view.close(completed=True)

    last = out.getvalue().split("\r")[-1]  # the bar redraws in place
    assert last == f"{BASE} [{'#' * 15}{'.' * 15}] 3.5 GB / 6.9 GB  85.3 MB/s\n"


def test_a_resumed_pull_reports_what_it_downloaded_not_the_whole_size(
    tmp_path: Path, civitai: FakeCivitai, base: bytes
) -> None:
    cache = tmp_path / "cache"
    held = len(base) // 3
    stored = civitai.object_of(128078, 126002)
    stored.hold_after = held  # storage sends a third, then stalls until released
    first = _start_pull(cache, civitai)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (partial_files(cache) and partial_files(cache)[0].stat().st_size >= held):
            assert first.poll() is None and time.monotonic() < deadline, "the first third never arrived"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)  # an operator's ^C that went too far, a reboot
        first.communicate(timeout=TIMEOUT_S)
    finally:
        stored.release.set()
    kept = partial_files(cache)[0].stat().st_size

    resumed = refinery("pull", BASE, cache=cache, civitai=civitai)

    assert resumed.returncode == 0, resumed.stderr
    assert f"{format_bytes(len(base) - kept)} downloaded, {format_bytes(kept)} were already here" in resumed.stderr
    assert civitai.storage.gets()[-1].headers["range"] == f"bytes={kept}-"


def _start_pull(cache: Path, civitai: FakeCivitai) -> subprocess.Popen[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "REFINERY_CACHE_DIR": str(cache)}
    environment["REFINERY_CIVITAI_API"] = civitai.url
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "models", "pull", BASE],
        cwd=cache.parent,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_resumed_pull_on_a_terminal_says_what_was_already_here() -> None:
    out = io.StringIO()
    view = PullView(BASE, out, interactive=True)
    view.show(
        PullProgress(
            BASE,
            bytes_done=6_900_000_000,
            bytes_total=6_900_000_000,
            bytes_per_second=0,
            bytes_transferred=2_300_000_000,
        )
    )
    view.close(completed=True)

    assert out.getvalue().endswith(f"{BASE}: 2.3 GB downloaded, 4.6 GB were already here (0 B/s)\n")


def test_verify_finds_a_flipped_byte_sets_it_aside_and_downloads_again(
    tmp_path: Path, civitai: FakeCivitai, storage: FakeStorage, base: bytes
) -> None:
    cache = tmp_path / "cache"
    size = format_bytes(len(base))
    assert refinery("pull", BASE, cache=cache, civitai=civitai).returncode == 0
    intact = refinery("verify", cache=cache, civitai=civitai)
    assert (intact.returncode, intact.stdout) == (0, f"{BASE}: intact ({size} read)\n1 model: 1 intact\n")

    (blob,) = blob_files(cache)
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(len(base) // 2)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")

    offline = refinery("verify", BASE, cache=cache, civitai=civitai, REFINERY_OFFLINE="1")
    assert offline.returncode == 1, offline.stderr
    first, last = offline.stdout.splitlines()
    assert first.startswith(f"{BASE}: CORRUPT: model.safetensors does not match its SHA256")
    assert "offline mode" in first and last == "1 model: 1 corrupt"
    assert str(cache) not in offline.stdout
    assert len(storage.gets()) == 1

    repaired = refinery("verify", BASE, cache=cache, civitai=civitai)
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.startswith(f"{BASE}: REPAIRED: model.safetensors failed its check earlier")
    assert blob_files(cache)[0].read_bytes() == base and len(storage.gets()) == 2


def test_a_pull_of_a_damaged_cached_model_downloads_it_again(
    tmp_path: Path, civitai: FakeCivitai, storage: FakeStorage, base: bytes
) -> None:
    cache = tmp_path / "cache"
    assert refinery("pull", BASE, cache=cache, civitai=civitai).returncode == 0
    (blob,) = blob_files(cache)
    blob.chmod(0o644)
    blob.write_bytes(base[:-1] + bytes([base[-1] ^ 1]))

    again = refinery("pull", BASE, cache=cache, civitai=civitai)

    assert again.returncode == 0, again.stderr
    assert f"{format_bytes(len(base))} downloaded (" in again.stderr
    assert blob_files(cache)[0].read_bytes() == base and len(storage.gets()) == 2
