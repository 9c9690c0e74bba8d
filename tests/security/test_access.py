"""Issue 13, finding 2: who may call what. Tokens for generation and for administration, the statuses gRPC
defines for a missing and for an insufficient credential, open health and reflection, administration only
from the server's own machine when no admin token is set, and tokens that never reach a log or an error."""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from refinery.v1 import models_pb2, models_pb2_grpc, status_pb2, status_pb2_grpc
from server.api.access import is_loopback
from server.settings import Security
from tests.integration.conftest import ServerThread, make_settings

from .conftest import ADMIN_TOKEN, TIMEOUT_S, TOKEN

WRONG = "guess-0b1c2d3e4f5a6b7c8d"
SECRETS = (TOKEN, ADMIN_TOKEN, WRONG)

OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED

Metadata = tuple[tuple[str, str], ...]
# Each call, made so that it ends quickly once past the gate (the status it then gets is its second element).
Call = Callable[[grpc.Channel, Metadata], Any]


def _generate(channel: grpc.Channel, metadata: Metadata) -> Any:
    stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
    return list(stub.Generate(pb.GenerateRequest(positive_prompt=" "), metadata=metadata, timeout=TIMEOUT_S))


def _unary(stub_class: Any, method: str, request: Any) -> Call:
    def call(channel: grpc.Channel, metadata: Metadata) -> Any:
        return getattr(stub_class(channel), method)(request, metadata=metadata, timeout=TIMEOUT_S)

    return call


def _pull(channel: grpc.Channel, metadata: Metadata) -> Any:
    stub = models_pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    return list(stub.PullModel(models_pb2.PullModelRequest(model="not an air"), metadata=metadata, timeout=TIMEOUT_S))


def _verify(channel: grpc.Channel, metadata: Metadata) -> Any:
    stub = models_pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    request = models_pb2.VerifyModelRequest(model="not an air")
    return list(stub.VerifyModel(request, metadata=metadata, timeout=TIMEOUT_S))


_Models, _Server = models_pb2_grpc.ModelServiceStub, status_pb2_grpc.ServerServiceStub
GENERATION: dict[str, tuple[Call, grpc.StatusCode]] = {
    "Generate": (_generate, INVALID),
    "GetStatus": (_unary(_Server, "GetStatus", status_pb2.GetStatusRequest()), OK),
    "ListModels": (_unary(_Models, "ListModels", models_pb2.ListModelsRequest()), OK),
}
ADMINISTRATION: dict[str, tuple[Call, grpc.StatusCode]] = {
    "PullModel": (_pull, INVALID),
    "VerifyModel": (_verify, INVALID),
    "DeleteModel": (_unary(_Models, "DeleteModel", models_pb2.DeleteModelRequest(model="not an air")), INVALID),
    "PinModel": (_unary(_Models, "PinModel", models_pb2.PinModelRequest(model="not an air")), INVALID),
    "UnpinModel": (_unary(_Models, "UnpinModel", models_pb2.UnpinModelRequest(model="not an air")), INVALID),
    "PinPair": (_unary(_Server, "PinPair", status_pb2.PinPairRequest()), INVALID),
    "UnpinPair": (_unary(_Server, "UnpinPair", status_pb2.UnpinPairRequest()), INVALID),
}


def code_of(call: Call, channel: grpc.Channel, metadata: Metadata, seen: list[str]) -> grpc.StatusCode:
    try:
        call(channel, metadata)
    except grpc.RpcError as err:
        seen.append(err.details() or "")
        seen.extend(str(item.value) for item in err.trailing_metadata() or ())
        return err.code()
    return OK


def bearer(token: str, scheme: str = "Bearer") -> Metadata:
    return (("authorization", f"{scheme} {token}"),)


# What each credential gets: (generation, administration).
CREDENTIALS: dict[str, tuple[Metadata, grpc.StatusCode | None, grpc.StatusCode | None]] = {
    "no credential": ((), UNAUTHENTICATED, UNAUTHENTICATED),
    "a wrong token": (bearer(WRONG), UNAUTHENTICATED, UNAUTHENTICATED),
    "the token in another scheme": (bearer(TOKEN, "Basic"), UNAUTHENTICATED, UNAUTHENTICATED),
    "the admin token in another scheme": (bearer(ADMIN_TOKEN, "Token"), UNAUTHENTICATED, UNAUTHENTICATED),
    "a prefix of the token": (bearer(TOKEN[:-1]), UNAUTHENTICATED, UNAUTHENTICATED),
    "the generation token": (bearer(TOKEN), None, DENIED),
    "the generation token, lower-case scheme": (bearer(TOKEN, "bearer"), None, DENIED),
    "the admin token": (bearer(ADMIN_TOKEN), None, None),
}


@pytest.mark.parametrize("credential", CREDENTIALS)
def test_each_credential_reaches_what_it_should(
    credential: str, guarded: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """None in the table: past the gate, so the call gets the status its request earns."""
    metadata, generation, administration = CREDENTIALS[credential]
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with grpc.insecure_channel(guarded.address) as channel:
        got = {
            name: code_of(call, channel, metadata, seen) for name, (call, _) in (GENERATION | ADMINISTRATION).items()
        }
    expected = {name: generation or past for name, (_, past) in GENERATION.items()}
    expected |= {name: administration or past for name, (_, past) in ADMINISTRATION.items()}
    assert got == expected
    # Neither a valid nor a guessed token is ever written to the log or sent back in an error.
    for secret in SECRETS:
        assert secret not in caplog.text
        assert not any(secret in text for text in seen)


def test_health_and_reflection_are_open(guarded: ServerThread) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status == 1  # SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert next(watch).status == 1
        watch.cancel()
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "refinery.v1.GenerationService" in services


def test_refusals_say_which_token_is_missing(guarded: ServerThread) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        stub = status_pb2_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.UnpinPair(status_pb2.UnpinPairRequest(), timeout=TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as user:
            stub.UnpinPair(status_pb2.UnpinPairRequest(), metadata=bearer(TOKEN), timeout=TIMEOUT_S)
    assert "admin" in (anonymous.value.details() or "")
    assert "admin token" in (user.value.details() or "")


# ---- without an admin token: administration from loopback only ----------------------------------------------


def non_loopback_addresses() -> list[str]:
    """This machine's own addresses that are not loopback (IPv4 by ioctl, IPv6 from /proc), for a client that
    reaches the server as a remote one would, without leaving the machine."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            found.append(socket.inet_ntoa(packed[20:24]))
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                found.append(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    except OSError:
        pass
    usable = [a for a in found if not (ip := ipaddress.ip_address(a)).is_loopback and not ip.is_link_local]
    return [f"[{a}]" if ":" in a else a for a in usable]


@pytest.fixture(scope="module")
def open_admin(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    """A server with a generation token but no admin token, on every address of the machine."""
    settings = make_settings(store_settings, host="[::]", pins=(), security=Security(token=TOKEN))
    thread = ServerThread(settings, store=model_store)
    try:
        yield thread
    finally:
        thread.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
def test_without_an_admin_token_the_machine_itself_may_administer(open_admin: ServerThread, host: str) -> None:
    with grpc.insecure_channel(f"{host}:{open_admin.server.port}") as channel:
        seen: list[str] = []
        for name, (call, past) in ADMINISTRATION.items():
            assert code_of(call, channel, (), seen) is past, name
        # Generation still needs its token, from loopback too.
        assert code_of(GENERATION["GetStatus"][0], channel, (), seen) is UNAUTHENTICATED


def test_without_an_admin_token_a_remote_client_may_not_administer(open_admin: ServerThread) -> None:
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no address besides loopback")
    for host in addresses:
        with grpc.insecure_channel(f"{host}:{open_admin.server.port}") as channel:
            seen: list[str] = []
            for name, (call, _) in ADMINISTRATION.items():
                # Even with the generation token: it is not an admin token.
                assert code_of(call, channel, bearer(TOKEN), seen) is DENIED, (host, name)
            assert all("only from the server's own machine" in text for text in seen[::2])
            assert code_of(GENERATION["GetStatus"][0], channel, bearer(TOKEN), seen) is OK


def test_peers_are_loopback_in_every_form_grpc_writes_them() -> None:
    assert is_loopback("ipv4:127.0.0.1:50000")
    assert is_loopback("ipv6:%5B::1%5D:50000")  # gRPC percent-encodes the brackets
    assert is_loopback("ipv6:[::1]:50000")
    assert is_loopback("ipv6:%5B::ffff:127.0.0.1%5D:50000")  # IPv4-mapped
    assert is_loopback("unix:/run/refinery.sock")
    assert not is_loopback("ipv4:192.0.2.7:50000")
    assert not is_loopback("ipv6:%5B2001:db8::1%5D:50000")
    assert not is_loopback("ipv6:%5B::ffff:192.0.2.7%5D:50000")
    assert not is_loopback("ipv6:%5Bfe80::1%25eth0%5D:50000")
    assert not is_loopback("nonsense")


def test_the_start_up_log_says_who_may_administer(
    store_settings: StoreSettings, model_store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    for security in (Security(), Security(token=TOKEN), Security(token=TOKEN, admin_token=ADMIN_TOKEN)):
        caplog.clear()
        thread = ServerThread(make_settings(store_settings, pins=(), security=security), store=model_store)
        thread.close()
        loopback_only = "allowed only from this machine (loopback)" in caplog.text
        assert loopback_only is (security.admin_token is None)
        anyone = f"anyone who can reach 127.0.0.1:{thread.server.port} may generate"  # the port it bound
        assert (anyone in caplog.text) is (security.token is None)
        assert TOKEN not in caplog.text and ADMIN_TOKEN not in caplog.text


@pytest.mark.parametrize(("host", "level"), [("127.0.0.1", logging.INFO), ("0.0.0.0", logging.WARNING)])
def test_open_access_is_a_warning_only_where_other_machines_can_call(
    store_settings: StoreSettings, model_store: ModelStore, caplog: pytest.LogCaptureFixture, host: str, level: int
) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    thread = ServerThread(make_settings(store_settings, host=host, pins=()), store=model_store)
    thread.close()
    about_access = [r for r in caplog.records if "may generate" in r.message or "only from this machine" in r.message]
    assert len(about_access) == 2 and {r.levelno for r in about_access} == {level}
