"""Helpers for the trust-boundary tests (issue 13): the server as `refinery serve` runs it in a process of its
own, a gRPC call's whole answer as one comparable value, and test certificates made with `openssl`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from PIL import Image

from modelstore import ModelStore, StoreSettings
from refinery.v1 import status_pb2, status_pb2_grpc
from server.core.domain import RenderShape, Sample, Stage
from server.core.settings import Security
from server.generation import PipelinePair, RunResult, StageTimings, StepState
from server.generation.runner import StepObserver
from tests.integration.conftest import ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120  # a hang fails the test instead of the whole run; never an expectation about speed
TOKEN = "gen-7f3a9c2e51b84d06a1"
ADMIN_TOKEN = "adm-c41d0be98e2f4a7753"
_LISTENING = re.compile(r"listening on [^ ]+:(\d+) ")


@dataclass(frozen=True)
class Answer:
    """Everything a client learns from a call that failed: what streamed before, the status code, its
    message, and the trailing metadata (which carries the google.rpc.Status details as bytes)."""

    responses: tuple[bytes, ...]
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str | bytes], ...]


def answer_of(call: Callable[[], Any]) -> Answer:
    """Run `call` (returning a message, or an iterator of messages) and describe how it ended; it must fail."""
    received: list[bytes] = []
    try:
        result = call()
        if hasattr(result, "SerializeToString"):
            received.append(result.SerializeToString())
        else:
            received.extend(message.SerializeToString() for message in result)
    except grpc.RpcError as err:
        trailers = tuple((item.key, item.value) for item in err.trailing_metadata() or ())
        return Answer(tuple(received), err.code(), err.details() or "", trailers)
    raise AssertionError(f"the call succeeded ({len(received)} message(s))")


def get_status(channel: grpc.Channel) -> grpc.StatusCode:
    """How a GetStatus call ends: the cheapest call that passes the access gate and the transport."""
    stub = status_pb2_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
    try:
        stub.GetStatus(status_pb2.GetStatusRequest(), timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def guarded(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    """A server with a generation token and an admin token, nothing pinned."""
    security = Security(token=TOKEN, admin_token=ADMIN_TOKEN)
    thread = ServerThread(make_settings(store_settings, pins=(), security=security), store=model_store)
    try:
        yield thread
    finally:
        thread.close()


def env_for_cli(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFINERY_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def refinery(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """The `refinery` command as a user runs it; it must end on its own."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=cwd,
        env=env if env is not None else env_for_cli(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ServeProcess:
    """`refinery serve` in a process of its own, on 127.0.0.1 and a free port; its log lines are collected."""

    def __init__(self, *args: str, cache: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        environment = env_for_cli(REFINERY_CACHE_DIR=str(cache), **(env or {}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=cwd,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._port: int | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(TIMEOUT_S) or self._port is None:
            self.kill()
            raise AssertionError("the server did not start:\n" + self.log)
        self.port: int = self._port
        self.address: str = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            found = _LISTENING.search(line)
            if found and self._port is None:
                self._port = int(found.group(1))
                self._listening.set()
        self._listening.set()  # it ended: whoever waits learns so at once

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def memory(self, field: str) -> int:
        """Bytes of a memory field of /proc/PID/status: VmRSS (resident now), VmHWM (the most ever resident)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"/proc/{self.process.pid}/status has no {field}")

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        code = self.process.wait(timeout)
        self._reader.join(TIMEOUT_S)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


@pytest.fixture
def serve_process(store_settings: StoreSettings, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `refinery serve` with extra flags (over the session's model cache); stopped after the test."""
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        process = ServeProcess(*args, cache=store_settings.cache_dir, cwd=tmp_path, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


# ---- certificates -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for localhost / 127.0.0.1 signed by it, a client certificate signed by it, and
    a client certificate signed by another CA (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=TIMEOUT_S)


def _signed(name: str, ca: str, cwd: Path, *extensions: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=refinery test {ca}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
                 cwd=folder)  # fmt: skip
    _signed("server", "ca", folder, "subjectAltName=DNS:localhost,IP:127.0.0.1", "extendedKeyUsage=serverAuth")
    _signed("client", "ca", folder, "extendedKeyUsage=clientAuth")
    _signed("stranger", "other-ca", folder, "extendedKeyUsage=clientAuth")
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        stranger_cert=folder / "stranger.pem",
        stranger_key=folder / "stranger.key",
    )


# ---- a stand-in device with a known cost (admission and log-line tests) -------------------------------------

FIXED_S = 0.2  # a run's fixed part: half before the steps (the prompts), half after (the decode)
STEP_S = 0.02  # a step at 256 x 256; in proportion to the pixels


def timed_device(
    pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
) -> RunResult:
    """Reports every step like the runner, sleeping what a device of this cost would take; no model runs."""
    time.sleep(FIXED_S / 2)
    per_step = STEP_S * shape.width * shape.height / (256 * 256)
    latents = torch.zeros(len(samples), 4, shape.height // 8, shape.width // 8)
    for overall in range(1, shape.steps + 1):
        time.sleep(per_step)
        observer.on_step(StepState(Stage.BASE, overall, shape.steps, overall, shape.steps, latents, 1.0))
    time.sleep(FIXED_S / 2)
    return RunResult([Image.new("RGB", (shape.width, shape.height)) for _ in samples], StageTimings())


@pytest.fixture
def timed(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    """A server over `timed_device`, one request per batch, nothing pinned."""
    thread = ServerThread(make_settings(store_settings, pins=(), max_batch=1), store=model_store, run=timed_device)
    try:
        yield thread
    finally:
        thread.close()
