"""Issue 13, finding 2: who may call what. Tokens for generation and for administration, the statuses gRPC
defines for a missing and for an insufficient credential, open health and reflection, administration only
from the server's own machine when no admin token is set, and tokens that never reach a log or an error."""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import ipaddress
import logging
import pkgutil
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import refinery.v1
from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from refinery.v1 import models_pb2, models_pb2_grpc, status_pb2, status_pb2_grpc
from server.api.access import METHODS, Access, AccessInterceptor, check_served, is_loopback, is_loopback_host
from server.core.settings import Security
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


def _upload(channel: grpc.Channel, metadata: Metadata) -> Any:
    stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
    # Past the gate, a stream without its header first is INVALID_ARGUMENT: nothing is stored.
    return stub.UploadImage(iter([pb.UploadImageRequest(data=b"x")]), metadata=metadata, timeout=TIMEOUT_S)


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
    "UploadImage": (_upload, INVALID),
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
    """A server with a generation token but no admin token, on every address of the machine, whose operator
    trusts loopback peers with administration (issue 21 made that an explicit opt-in: test_admin_trust.py)."""
    security = Security(token=TOKEN, trust_loopback_admin=True)
    settings = make_settings(store_settings, host="[::]", pins=(), security=security)
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


def test_listening_hosts_are_loopback_in_every_form_an_operator_writes_them() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "::ffff:127.0.0.1", "[::1%lo]"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "[::]", "192.0.2.7", "::ffff:192.0.2.7", "example.com", ""):
        assert not is_loopback_host(host), host


# ---- every method has a level; what the gate cannot guard is not served ------------------------------------

# Every service of every refinery.v1 proto file, a new file's too.
SERVICES = [
    service
    for info in pkgutil.iter_modules(refinery.v1.__path__)
    if info.name.endswith("_pb2")
    for service in importlib.import_module(f"refinery.v1.{info.name}").DESCRIPTOR.services_by_name.values()
]


def test_every_method_of_every_service_has_an_access_level() -> None:
    methods = {f"/{service.full_name}/{method.name}" for service in SERVICES for method in service.methods}
    assert {service.full_name for service in SERVICES} == {
        "refinery.v1.GenerationService",
        "refinery.v1.ModelService",
        "refinery.v1.ServerService",
    }
    assert methods == set(METHODS)  # every method classified, and no row for a method that is gone
    # ... as the calls above expect: the generation token reaches GENERATION, only the admin one ADMINISTRATION.
    levels = {access: {name.rsplit("/", 1)[1] for name, a in METHODS.items() if a is access} for access in Access}
    assert levels == {Access.OPEN: set(), Access.GENERATE: set(GENERATION), Access.ADMIN: set(ADMINISTRATION)}
    check_served(SERVICES)  # what the server serves passes its start-up check


def _service(name: str, *methods: tuple[str, bool]) -> Any:
    return SimpleNamespace(
        full_name=name, methods=[SimpleNamespace(name=m, client_streaming=streams) for m, streams in methods]
    )


def test_a_method_the_gate_cannot_guard_stops_the_start() -> None:
    with pytest.raises(RuntimeError, match=r"/refinery\.v1\.ModelService/WipeCache has no access level"):
        check_served([_service("refinery.v1.ModelService", ("ListModels", False), ("WipeCache", False))])
    # A method that streams requests is guarded like any other (UploadImage); health and reflection are open.
    check_served([_service("refinery.v1.GenerationService", ("UploadImage", True))])
    check_served([_service("grpc.reflection.v1alpha.ServerReflection", ("ServerReflectionInfo", True))])


async def _call_unguardable_methods() -> tuple[list[grpc.StatusCode], list[str]]:
    """A bare server with the access interceptor and handlers it cannot guard, each called with the admin token:
    methods with no level (one answering, one streaming its answers, one streaming requests). The codes the calls
    ended with, and the handlers that ran."""
    reached: list[str] = []

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        reached.append("WipeCache")
        return b"served"

    async def answers(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        reached.append("WatchCache")
        yield b"served"

    async def streamed(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        reached.append("ImportCache")
        return b"served"

    handlers = {
        "WipeCache": grpc.unary_unary_rpc_method_handler(unary),
        "WatchCache": grpc.unary_stream_rpc_method_handler(answers),
        "ImportCache": grpc.stream_unary_rpc_method_handler(streamed),
    }
    registry = prometheus_client.CollectorRegistry()
    calls = prometheus_client.Counter("calls", "calls", ["method", "code"], registry=registry)
    server = grpc.aio.server(interceptors=[AccessInterceptor(Security(token=TOKEN, admin_token=ADMIN_TOKEN), calls)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("refinery.v1.ModelService", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes: list[grpc.StatusCode] = []
    admin = {"metadata": bearer(ADMIN_TOKEN), "timeout": TIMEOUT_S}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls_made = (
                channel.unary_unary("/refinery.v1.ModelService/WipeCache")(b"", **admin),
                channel.unary_stream("/refinery.v1.ModelService/WatchCache")(b"", **admin),
                channel.stream_unary("/refinery.v1.ModelService/ImportCache")(iter([b""]), **admin),
            )
            for call in calls_made:
                try:
                    if isinstance(call, grpc.aio.UnaryStreamCall):
                        _ = [message async for message in call]
                    else:
                        await call
                    codes.append(OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
    finally:
        await server.stop(0)
    return codes, reached


def test_a_method_the_gate_cannot_guard_is_refused_even_to_the_admin(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="server.api.access")
    codes, reached = asyncio.run(_call_unguardable_methods())
    assert codes == [grpc.StatusCode.UNIMPLEMENTED] * 3 and reached == []
    assert sum("the access check cannot guard it" in r.message for r in caplog.records) == 3


def test_the_start_up_log_says_who_may_administer(
    store_settings: StoreSettings, model_store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    # The loopback line is about the operator's opt-in (without it administration is off: test_admin_trust.py).
    for security in (
        Security(trust_loopback_admin=True),
        Security(token=TOKEN, trust_loopback_admin=True),
        Security(token=TOKEN, admin_token=ADMIN_TOKEN, trust_loopback_admin=True),
    ):
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
