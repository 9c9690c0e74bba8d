"""Issue 21, item 3: administration needs a credential wherever a proxy can stand in front.

A loopback peer is not trusted by default (nginx on the replica's host made every remote caller one); the
operator may opt in (`--trust-loopback-admin`). `refinery generate`'s own server serves only its caller: every
call needs the secret drawn for that run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from deploy.local.fleet import free_ports
from deploy.local.nginx import Nginx, nginx_binary
from modelstore import ModelStore, StoreSettings
from refinery.v1 import status_pb2, status_pb2_grpc
from server.cli import generate
from server.cli.main import build_parser
from server.core.settings import Security
from tests.integration.conftest import ServerThread, make_settings

from .conftest import ADMIN_TOKEN, TIMEOUT_S, TOKEN, ServeProcess
from .test_access import ADMINISTRATION, DENIED, GENERATION, OK, UNAUTHENTICATED, bearer, code_of


@pytest.fixture(scope="module")
def untrusting(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    """A generation token, no admin token, and no opt-in: the defaults of `refinery serve`."""
    thread = ServerThread(make_settings(store_settings, pins=(), security=Security(token=TOKEN)), store=model_store)
    try:
        yield thread
    finally:
        thread.close()


def test_without_an_admin_token_loopback_may_not_administer_by_default(untrusting: ServerThread) -> None:
    with grpc.insecure_channel(untrusting.address) as channel:
        for credential in ((), bearer(TOKEN)):
            seen: list[str] = []
            for name, (call, _) in ADMINISTRATION.items():
                assert code_of(call, channel, credential, seen) is DENIED, name
            assert all("no admin token (REFINERY_ADMIN_TOKEN)" in text for text in seen[::2]), seen
        assert code_of(GENERATION["GetStatus"][0], channel, bearer(TOKEN), []) is OK


def test_the_start_up_log_says_administration_is_off(
    store_settings: StoreSettings, model_store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    thread = ServerThread(make_settings(store_settings, pins=(), security=Security()), store=model_store)
    thread.close()
    assert "administration (pull, pin, delete, ...) is off" in caplog.text
    assert "loopback" not in caplog.text


def _administers(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    """UnpinPair of nothing: INVALID_ARGUMENT once past the gate."""
    with grpc.insecure_channel(address) as channel:
        return code_of(ADMINISTRATION["UnpinPair"][0], channel, metadata, [])


def test_the_operator_opts_in_to_loopback_administration(serve_process: Callable[..., ServeProcess]) -> None:
    common = ("--pin", "none", "--devices", "cpu")
    default = serve_process(*common)
    flag = serve_process(*common, "--trust-loopback-admin")
    variable = serve_process(*common, env={"REFINERY_TRUST_LOOPBACK_ADMIN": "yes"})
    assert _administers(default.address) is DENIED
    assert _administers(flag.address) is grpc.StatusCode.INVALID_ARGUMENT
    assert _administers(variable.address) is grpc.StatusCode.INVALID_ARGUMENT
    assert "--trust-loopback-admin" in flag.log and "--trust-loopback-admin" not in default.log


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_behind_nginx_on_the_same_host_administration_needs_the_admin_token(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    """The deploy kit's nginx template in front of a replica: every caller reaches it from loopback."""
    for security, anonymous in (
        (Security(), DENIED),  # the default: no credential, no administration
        (Security(admin_token=ADMIN_TOKEN), UNAUTHENTICATED),
        (Security(trust_loopback_admin=True), grpc.StatusCode.INVALID_ARGUMENT),  # the hole the opt-in opens
    ):
        replica = ServerThread(make_settings(store_settings, pins=(), security=security), store=model_store)
        front = f"127.0.0.1:{free_ports('127.0.0.1', 1)[0]}"
        proxy = Nginx(listen=front, servers=[replica.address], run_dir=tmp_path / f"nginx-{anonymous.name}")
        try:
            proxy.start()
            assert _administers(front) is anonymous, security
            if security.admin_token:
                assert _administers(front, bearer(ADMIN_TOKEN)) is grpc.StatusCode.INVALID_ARGUMENT
        finally:
            proxy.stop()
            replica.close()


async def _calls_to_the_in_process_server(cache: Path) -> dict[str, grpc.StatusCode]:
    env = {"REFINERY_OFFLINE": "1"}
    args = build_parser(env).parse_args(["generate", "a cat", "--devices", "cpu", "--cache-dir", str(cache)])
    got: dict[str, grpc.StatusCode] = {}
    async with generate._in_process_server(args, env) as (address, run_token):
        for name, metadata in (
            ("nothing", ()),
            ("a wrong token", bearer("guess-0123456789")),
            ("the run's secret", bearer(run_token)),
        ):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = status_pb2_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
                for method, request in (
                    ("GetStatus", status_pb2.GetStatusRequest()),
                    ("UnpinPair", status_pb2.UnpinPairRequest()),
                ):
                    try:
                        await getattr(stub, method)(request, metadata=metadata, timeout=TIMEOUT_S)
                        got[f"{method} with {name}"] = OK
                    except grpc.aio.AioRpcError as err:
                        got[f"{method} with {name}"] = err.code()
    return got


def test_the_server_inside_generate_serves_only_its_caller(store_settings: StoreSettings) -> None:
    got = asyncio.run(_calls_to_the_in_process_server(store_settings.cache_dir))
    assert got == {
        "GetStatus with nothing": UNAUTHENTICATED,
        "UnpinPair with nothing": UNAUTHENTICATED,
        "GetStatus with a wrong token": UNAUTHENTICATED,
        "UnpinPair with a wrong token": UNAUTHENTICATED,
        "GetStatus with the run's secret": OK,
        "UnpinPair with the run's secret": grpc.StatusCode.INVALID_ARGUMENT,  # past the gate
    }
