"""Shared fixtures. The whole test session runs with no network: only loopback connections are allowed, so a
test that would reach civitai or Hugging Face fails loudly instead of passing by luck."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelstore import ModelStore, StoreSettings
from tests.fakes.civitai import FakeCivitai, FakeStorage
from tests.fakes.hub import FakeCDN, FakeHub

CIVITAI_TOKEN = "civitai-secret-token-0123456789abcdef"
HF_TOKEN = "hf_secret_token_0123456789abcdefghij"
TINY_BASE = "builtin:tiny-sdxl-base@1"
TINY_REFINER = "builtin:tiny-sdxl-refiner@1"

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_loopback(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    if not _is_loopback(address):
        raise OSError(f"tests must not reach the network (tried {address!r})")
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> Any:
    if not _is_loopback(address):
        raise OSError(f"tests must not reach the network (tried {address!r})")
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> Iterator[None]:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = _real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def store_settings(tmp_path_factory: pytest.TempPathFactory) -> StoreSettings:
    """One cache for the session: the tiny built-in models are created once and shared by every test."""
    cache: Path = tmp_path_factory.mktemp("refinery-cache")
    return StoreSettings(cache_dir=cache, offline=True)


@pytest.fixture(scope="session")
def model_store(store_settings: StoreSettings) -> ModelStore:
    return ModelStore(store_settings)


# ---- fake model sources: real HTTP servers on loopback ----------------------------------------------------


@pytest.fixture
def storage() -> Iterator[FakeStorage]:
    server = FakeStorage()
    yield server
    server.close()


@pytest.fixture
def civitai(storage: FakeStorage) -> Iterator[FakeCivitai]:
    server = FakeCivitai(storage, token=CIVITAI_TOKEN)
    yield server
    server.close()


@pytest.fixture
def cdn() -> Iterator[FakeCDN]:
    server = FakeCDN()
    yield server
    server.close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub(token=HF_TOKEN)
    yield server
    server.close()
