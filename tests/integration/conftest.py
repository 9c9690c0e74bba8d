"""A real Refinery server on loopback for the integration tests, driven through real gRPC clients.

The server runs on its own event loop in a background thread, exactly as in production (grpc.aio plus one
device worker thread); tests talk to it with the plain synchronous gRPC client, as most callers would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelstore import ModelRecord, ModelStore, Role, StoreSettings, load_pipeline
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.app import RefineryServer
from server.core.settings import DEFAULT_PAIR, Security, Settings

T = TypeVar("T")
TIMEOUT_S = 120  # a hang fails the test instead of the whole run; never an expectation about speed


class ServerThread:
    """`RefineryServer` on 127.0.0.1:0 in a thread with its own event loop."""

    def __init__(self, settings: Settings, **server_args: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.server: RefineryServer = self.call(self._make(settings, server_args))
        self.address = f"127.0.0.1:{self.server.port}"

    async def _make(self, settings: Settings, server_args: dict[str, Any]) -> RefineryServer:
        server = RefineryServer(settings, **server_args)
        await server.start()
        return server

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT_S) -> T:
        """Run `coro` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop_in_background(self) -> concurrent.futures.Future[None]:
        """Begin a graceful stop (the settings' grace period) without waiting for it."""
        return asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop)

    def wait_ready(self) -> None:
        self.call(self.server.wait_ready())

    def close(self) -> None:
        try:
            self.call(self.server.stop(0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(TIMEOUT_S)
            self._loop.close()


class GatedLoader:
    """The real loader, held back until the test lets it go."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, record: ModelRecord, *, role: Role, device: str, dtype: Any = None, **kwargs: Any) -> Any:
        assert self.release.wait(TIMEOUT_S)
        return load_pipeline(record, role=role, device=device, dtype=dtype, **kwargs)


def make_settings(store_settings: StoreSettings, **overrides: Any) -> Settings:
    settings = Settings(
        store=store_settings,
        host="127.0.0.1",
        port=0,
        devices=("cpu",),
        default_model=DEFAULT_PAIR.base,
        default_refiner=DEFAULT_PAIR.refiner,
        pins=(DEFAULT_PAIR,),
        grace_period_s=10.0,
        drain_delay_s=0.0,  # tests of the delay set it
        # The tests' own files (under the temp folder) are local models the operator allows; the tests administer
        # their loopback server as its operator, who opts in to that (issue 21: off by default).
        security=Security(local_model_roots=(Path(tempfile.gettempdir()),), trust_loopback_admin=True),
    )
    return replace(settings, **overrides)


@pytest.fixture(scope="session")
def server(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    """The shared server: the tiny base and refiner preloaded, health SERVING."""
    thread = ServerThread(make_settings(store_settings), store=model_store)
    try:
        thread.wait_ready()
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="session")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as chan:
        yield chan


def new_stub(channel: grpc.Channel) -> pb_grpc.GenerationServiceStub:
    return pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]  # generated, unannotated


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.GenerationServiceStub:
    return new_stub(channel)


def collect(stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    """Every message of one Generate stream (raises grpc.RpcError if it ends with an error)."""
    return list(stub.Generate(request, timeout=TIMEOUT_S))


def events(responses: list[pb.GenerateResponse], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in responses if r.WhichOneof("event") == kind]


def bad_request_fields(err: grpc.RpcError) -> list[str]:
    """The fields an error's google.rpc.BadRequest details name."""
    status = rpc_status.from_call(err)
    assert status is not None, "the error carries no google.rpc.Status details"
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return fields


def wait_for_download_to_stop(caplog: pytest.LogCaptureFixture, model: str) -> None:
    """Until the store logs that it stopped downloading `model` (its partial file is closed by then)."""
    deadline = time.monotonic() + TIMEOUT_S
    while f"stopped downloading {model}" not in caplog.text:
        assert time.monotonic() < deadline, "the download never stopped"
        time.sleep(0.01)
