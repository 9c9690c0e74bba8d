"""`refinery status`, `refinery pin|unpin` against a running server, `refinery proto` and `--version`: real
processes, as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from modelstore import ModelStore, StoreSettings

from .conftest import ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[2]
BASE = "builtin:tiny-sdxl-base@1"


def refinery(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("REFINERY_SERVER", None)
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_status_and_pinning_a_pair_at_run_time(store_settings: StoreSettings, model_store: ModelStore) -> None:
    thread = ServerThread(make_settings(store_settings), store=model_store)
    try:
        thread.wait_ready()
        status = refinery("status", "--server", thread.address)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0] == "queue: 0 of 64 waiting" and lines[1] == "running: 0 request(s)"
        assert lines[2].startswith("device cpu: ") and "budget resident" in lines[2]
        assert lines[3].split() == ["PAIR", "SIZE", "ACTIVE", "PINNED", "LAST", "USED", "(UTC)"]
        assert lines[4].split()[0] == "builtin:tiny-sdxl-base@1+builtin:tiny-sdxl-refiner@1"
        assert lines[4].split()[4] == "yes"

        pinned = refinery("pin", BASE, "--server", thread.address)
        assert (pinned.returncode, pinned.stdout) == (0, f"pinned {BASE} on every device\n"), pinned.stderr
        rows = [line.split() for line in refinery("status", "--server", thread.address).stdout.splitlines()]
        assert [r[0] for r in rows if r and r[0] == BASE] + [r[4] for r in rows if r and r[0] == BASE] == [BASE, "yes"]

        unpinned = refinery("unpin", BASE, "--server", thread.address)
        assert (unpinned.returncode, unpinned.stdout) == (0, f"unpinned {BASE} on every device\n")
        again = refinery("unpin", BASE, "--server", thread.address)
        assert again.returncode == 1 and again.stderr.startswith("error: NOT_FOUND: ")
        malformed = refinery("pin", "civitai:nope", "--server", thread.address)
        assert malformed.returncode == 2 and "a civitai model id is a number" in malformed.stderr
    finally:
        thread.close()


def test_proto_writes_the_contract_for_other_languages(tmp_path: Path) -> None:
    written = refinery("proto", "--out", str(tmp_path))
    assert written.returncode == 0, written.stderr
    names = sorted(str(Path(line).relative_to(tmp_path)) for line in written.stdout.splitlines())
    assert names == [
        "google/rpc/code.proto",
        "google/rpc/error_details.proto",
        "google/rpc/status.proto",
        "refinery/v1/generation.proto",
        "refinery/v1/models.proto",
        "refinery/v1/status.proto",
    ]
    assert (tmp_path / "refinery/v1/generation.proto").read_text() == (
        ROOT / "proto/refinery/v1/generation.proto"
    ).read_text()


def test_version() -> None:
    version = refinery("--version")
    assert version.returncode == 0 and version.stdout.startswith("refinery ")
