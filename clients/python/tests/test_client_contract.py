"""The installed package carries the contract: every .proto of the buf module, written out for code
generators in other languages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from refinery.contract import write_protos

REPO_PROTO = Path(__file__).resolve().parents[3] / "proto"


def test_the_whole_module_is_shipped_as_it_is_in_the_repository(tmp_path: Path) -> None:
    written = write_protos(tmp_path)
    names = sorted(str(path.relative_to(tmp_path)) for path in written)
    assert names == [
        "google/rpc/code.proto",
        "google/rpc/error_details.proto",
        "google/rpc/status.proto",
        "refinery/v1/generation.proto",
        "refinery/v1/models.proto",
        "refinery/v1/status.proto",
    ]
    for name in names:
        assert (tmp_path / name).read_bytes() == (REPO_PROTO / name).read_bytes(), name


def test_writing_replaces_its_own_files_and_leaves_others(tmp_path: Path) -> None:
    (tmp_path / "refinery" / "v1").mkdir(parents=True)
    (tmp_path / "refinery" / "v1" / "generation.proto").write_text("stale")
    (tmp_path / "mine.proto").write_text("keep me")
    write_protos(tmp_path)
    assert b"service GenerationService" in (tmp_path / "refinery" / "v1" / "generation.proto").read_bytes()
    assert (tmp_path / "mine.proto").read_text() == "keep me"


def test_what_is_written_compiles_on_its_own(tmp_path: Path) -> None:
    """Including a client that decodes BadRequest: the google/rpc protos come along, nothing is fetched."""
    grpc_tools = pytest.importorskip("grpc_tools")
    write_protos(tmp_path / "proto")
    (tmp_path / "out").mkdir()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(tmp_path / "proto")) for p in (tmp_path / "proto").rglob("*.proto"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"-I{well_known}",
            "--python_out=out",
            *(f"proto/{f}" for f in files),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "google" / "rpc" / "error_details_pb2.py").exists()
    assert (tmp_path / "out" / "refinery" / "v1" / "generation_pb2.py").exists()
