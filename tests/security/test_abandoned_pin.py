"""A PinPair its client abandoned does not pin, and the pin thread survives it (issue 21, item 7)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from modelstore import ModelStore, StoreSettings
from refinery.v1 import status_pb2 as pb
from refinery.v1 import status_pb2_grpc as pb_grpc
from server.core.settings import DEFAULT_BASE, DEFAULT_REFINER
from tests.integration.conftest import GatedLoader, ServerThread, make_settings

from .conftest import TIMEOUT_S


@pytest.fixture
def thread_deaths(monkeypatch: pytest.MonkeyPatch) -> list[BaseException | None]:
    deaths: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: deaths.append(args.exc_value))
    return deaths


class _Loader(GatedLoader):
    """Held back like GatedLoader, and says when the first load began."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        return super().__call__(*args, **kwargs)


@pytest.fixture
def gated(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[tuple[ServerThread, _Loader]]:
    loader = _Loader()
    thread = ServerThread(make_settings(store_settings, pins=()), store=model_store, loader=loader)
    try:
        yield thread, loader
    finally:
        loader.release.set()
        thread.close()


def _pairs(status: pb_grpc.ServerServiceStub) -> list[tuple[str, bool]]:
    (device,) = status.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).devices
    return [(p.model, p.pinned) for p in device.pairs]


def test_an_abandoned_pin_pair_leaves_nothing_pinned(
    gated: tuple[ServerThread, _Loader], thread_deaths: list[BaseException | None]
) -> None:
    server, loader = gated
    pair = pb.PinPairRequest(model=DEFAULT_BASE, refiner_model=DEFAULT_REFINER)
    with grpc.insecure_channel(server.address) as channel:
        status = pb_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
        call = status.PinPair.future(pair, timeout=TIMEOUT_S)
        assert loader.entered.wait(TIMEOUT_S), "the pin never began to load"
        call.cancel()  # the client gives up while the pair loads
        time.sleep(0.5)  # for the server to hear of it
        loader.release.set()  # the loads that had started finish now
        deadline = time.monotonic() + TIMEOUT_S
        while (pairs := _pairs(status)) != [(DEFAULT_BASE, False)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pairs == [(DEFAULT_BASE, False)], "the abandoned pin stayed, or the pair never loaded"
        assert thread_deaths == []
        # The caller who waits gets the pin.
        (device,) = status.PinPair(pair, timeout=TIMEOUT_S).devices
        assert [(p.model, p.pinned) for p in device.pairs] == [(DEFAULT_BASE, True)]
