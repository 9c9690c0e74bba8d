"""Issue 21, item 3: behind nginx every caller reaches a replica from loopback, so the local fleet's replicas never
administer for an address: with `admin` the fleet draws a token per run (kept in an owner-only file) and they
administer only for it."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deploy.local.fleet import Fleet, FleetSettings
from deploy.local.nginx import nginx_binary
from refinery.v1 import status_pb2, status_pb2_grpc

from .conftest import NO_NGINX


@pytest.fixture
def small_fleet(fleet_cache: Path, tmp_path: Path) -> Iterator[Fleet]:
    if nginx_binary() is None:
        pytest.skip(NO_NGINX)
    with Fleet(
        FleetSettings(replicas=2, run_dir=tmp_path / "run", cache_dir=fleet_cache, grace_s=5.0, admin=True)
    ) as fleet:
        yield fleet


def _unpin_nothing(address: str, token: str | None) -> grpc.StatusCode:
    """UnpinPair of nothing: INVALID_ARGUMENT once past the gate."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        stub = status_pb2_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.UnpinPair(status_pb2.UnpinPairRequest(), metadata=metadata, timeout=60)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_the_fleet_administers_only_with_its_own_token(small_fleet: Fleet) -> None:
    token_file = small_fleet.admin_token_file
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token == small_fleet.admin_token and len(token) >= 32
    for address in (small_fleet.front, *(r.address for r in small_fleet.replicas)):
        assert _unpin_nothing(address, None) is grpc.StatusCode.UNAUTHENTICATED, address
        assert _unpin_nothing(address, "guess-0123456789") is grpc.StatusCode.UNAUTHENTICATED, address
        assert _unpin_nothing(address, token) is grpc.StatusCode.INVALID_ARGUMENT, address
