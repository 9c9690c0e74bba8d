"""A full disk is a clear, retryable state (issue 21, item 4), on a real tmpfs of a few MB under the cache.

A download that hit ENOSPC answered INTERNAL with a traceback; the partial file's resume was then refused,
because the free-space check compared the whole model with the free space. Now: RESOURCE_EXHAUSTED naming
the model cache, with RetryInfo; the resident pinned pair goes on serving and health stays SERVING; and once
space returns the download resumes from its partial file, needing only the bytes still missing.

Mounting needs root (CI runs as root); the test is skipped, saying so, only where mounting is refused.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from modelstore import ModelStore, OnDemandPolicy, StoreSettings
from modelstore._builtin import BUILTIN_MODELS, build
from refinery.v1 import generation_pb2 as pb
from tests.fakes.cachefs import partial_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage
from tests.fixtures.ldm_layout import write_single_file

from .conftest import TIMEOUT_S, ServerThread, collect, events, make_settings, new_stub

MODEL = "civitai:101055@128078"
DISK_MB = 72


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def checkpoint(tmp_path: Path) -> bytes:
    """The tiny built-in base as a civitai-style single file: a model that really loads and runs."""
    folder = tmp_path / "tiny-base"
    build(BUILTIN_MODELS["builtin:tiny-sdxl-base@1"], folder)
    return write_single_file(folder, tmp_path / "base.safetensors").read_bytes()


def fill(path: Path, leave: int = 0) -> None:
    """Write `path` until the disk under it has `leave` bytes free (0: until ENOSPC)."""
    block = b"\0" * (1 << 16)
    with path.open("ab") as f:
        while True:
            room = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize - leave
            if leave and room < len(block):
                f.write(block[: max(room, 0)])
                return
            try:
                f.write(block)
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


def request(model: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(positive_prompt="a lighthouse", model=model, steps=2, width=64, height=64)


def test_a_full_disk_is_retryable_keeps_the_resident_pair_serving_and_the_download_resumes(
    disk: Path, checkpoint: bytes, storage: FakeStorage, civitai: FakeCivitai
) -> None:
    civitai.add_version(101055, 128078, [(FakeFile(126002, "base.safetensors"), checkpoint)])
    link = civitai.object_of(128078, 126002)
    link.hold_after = len(checkpoint) // 2  # the transfer waits there while the test fills the disk
    settings = StoreSettings(
        cache_dir=disk / "cache",
        civitai_api=civitai.url,
        on_demand=OnDemandPolicy.parse("any"),
        min_free_bytes=0,
    )
    store = ModelStore(settings)
    thread = ServerThread(make_settings(settings, default_refiner=None), store=store)
    filler = disk / "filler"
    try:
        thread.wait_ready()  # the built-in pair is built on the tmpfs and resident
        with grpc.insecure_channel(thread.address) as channel:
            stub = new_stub(channel)
            call = stub.Generate(request(MODEL), timeout=TIMEOUT_S)
            for response in call:
                if response.WhichOneof("event") == "model_loading" and response.model_loading.bytes_done > 0:
                    break
            fill(filler)  # the disk is full while half the model is in its partial file
            link.release.set()
            with pytest.raises(grpc.RpcError) as full:
                list(call)
            assert full.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "model cache is full" in (full.value.details() or "")
            assert retry_delay(full.value) > 0
            (partial,) = partial_files(disk / "cache")
            kept = partial.stat().st_size
            assert kept >= len(checkpoint) // 2

            # The resident pair still serves, and health says so.
            assert events(collect(stub, request()), "image")
            health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            status = health.Check(health_pb2.HealthCheckRequest(service="refinery.v1.GenerationService"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING

            # Space returns: room for the bytes still missing, not for the whole model. The download resumes.
            filler.unlink()
            slack = 2 << 20
            assert len(checkpoint) - kept + slack < len(checkpoint)
            fill(filler, leave=len(checkpoint) - kept + slack)
            link.hold_after = None
            assert events(collect(stub, request(MODEL)), "image")
            assert storage.gets()[-1].headers.get("range") == f"bytes={kept}-"  # resumed
    finally:
        link.release.set()
        thread.close()
        store.close()


def retry_delay(error: grpc.RpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return 0.0
