"""`refinery --version` and `refinery proto` answer without loading torch (issue 20: they took 8.2 s and 5.8 s
because every command's module was imported, and one of them imported the servicers). Only what loads is
asserted here, never a time; the README's numbers come from `time refinery --version`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PROBE = """
import sys
from server.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("heavy:", sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules), "exit:", code)
"""


def _loaded_by(*argv: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    return run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr


def test_version_loads_no_torch() -> None:
    assert _loaded_by("--version") == "heavy: [] exit: 0"


def test_proto_writes_the_contract_without_torch(tmp_path: Path) -> None:
    assert _loaded_by("proto", "--out", str(tmp_path)) == "heavy: [] exit: 0"
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.proto"))
    assert "refinery/v1/generation.proto" in written and "google/rpc/error_details.proto" in written
