"""Who may call what, checked before any servicer runs: one server interceptor.

- Health and reflection are open (probes and tools need them).
- Generation and status (`Generate`, `GetStatus`, `ListModels`) need `authorization: Bearer <token>` when a
  generation or an admin token is configured; either token is accepted.
- Administration (pull, verify, pin, unpin, delete, `PinPair`, `UnpinPair`) needs the admin token. Without one
  it is off, unless the operator trusts loopback peers with it (`Security.trust_loopback_admin`,
  `--trust-loopback-admin`): not by default, because a proxy on the same host (nginx, a sidecar, a port-forward)
  makes every remote caller a loopback peer (issue 21, item 3). The server says at start-up which holds.
- Missing or wrong credentials are UNAUTHENTICATED; a valid generation token on an administrative call is
  PERMISSION_DENIED, as gRPC defines them. Tokens are compared in constant time and never logged or echoed.

Every method of the three services has its level in `METHODS`; none is guessed. The server does not start while
it serves a method missing there (`check_served`), and a call that still reaches such a method is refused
(UNIMPLEMENTED). A method that takes a stream of requests (`UploadImage`) is checked like any other, from the
call's metadata, before its first message is read: a refused upload stores nothing.

The same interceptor turns a request that is not valid protobuf into INVALID_ARGUMENT naming the message type,
with no traceback (gRPC itself answers UNKNOWN and logs an error for every such request).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import Counter

from server.api.lenient import HANDLER_KINDS, lenient, lenient_handler, reject
from server.core.settings import Security

log = logging.getLogger(__name__)


class Access(Enum):
    OPEN = "open"
    GENERATE = "generate"
    ADMIN = "admin"


# Health and reflection: every method of theirs, whatever their version of grpcio serves.
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.")
# Every method of the three services, by the credential it needs (tests/security/test_access.py walks the
# service descriptors: a method added to a .proto fails there until it has a row here).
METHODS: dict[str, Access] = {
    "/refinery.v1.GenerationService/Generate": Access.GENERATE,
    "/refinery.v1.GenerationService/UploadImage": Access.GENERATE,
    "/refinery.v1.ServerService/GetStatus": Access.GENERATE,
    "/refinery.v1.ModelService/ListModels": Access.GENERATE,
    "/refinery.v1.ModelService/PullModel": Access.ADMIN,
    "/refinery.v1.ModelService/DeleteModel": Access.ADMIN,
    "/refinery.v1.ModelService/PinModel": Access.ADMIN,
    "/refinery.v1.ModelService/UnpinModel": Access.ADMIN,
    "/refinery.v1.ModelService/VerifyModel": Access.ADMIN,
    "/refinery.v1.ServerService/PinPair": Access.ADMIN,
    "/refinery.v1.ServerService/UnpinPair": Access.ADMIN,
}


def access_of(method: str) -> Access | None:
    """The credential `method` ("/package.Service/Method") needs; None for a method with no level."""
    if method.startswith(_OPEN_SERVICES):
        return Access.OPEN
    return METHODS.get(method)


def check_served(services: Iterable[ServiceDescriptor]) -> None:
    """Refuse to serve what the gate cannot guard: a method with no level in `METHODS`. Raises RuntimeError
    naming them all."""
    problems: list[str] = []
    for service in services:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if access_of(path) is None:
                problems.append(f"{path} has no access level in server/api/access.py")
    if problems:
        raise RuntimeError("refusing to serve: " + "; ".join(problems))


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str


def is_loopback(peer: str) -> bool:
    """gRPC's peer string names a local caller: "ipv4:127.0.0.1:5000", "unix:/path", or an IPv6 one, which gRPC
    percent-encodes ("ipv6:%5B::1%5D:5000")."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    return is_loopback_host(urllib.parse.unquote(rest).rsplit(":", 1)[0])


def is_loopback_host(host: str) -> bool:
    """`host` (an address, bracketed or not, or "localhost") is this machine only. An IPv4-mapped address
    counts as its IPv4 one; a "%zone" suffix is ignored; "0.0.0.0" and "::" (every address) are not."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


class Gate:
    """The decision for one call, from its method, its metadata and its peer."""

    def __init__(self, security: Security) -> None:
        self._token = _secret(security.token)
        self._admin = _secret(security.admin_token)
        self._trust_loopback = security.trust_loopback_admin
        self._refusals = _Throttle(REFUSAL_LOG_EVERY_S)
        self._no_admin = (
            "administration is allowed only from the server's own machine (no admin token is configured)"
            if security.trust_loopback_admin
            else "administration is off: the server has no admin token (REFINERY_ADMIN_TOKEN)"
        )

    def refusal(self, access: Access, metadata: tuple[tuple[str, str | bytes], ...], peer: str) -> Refusal | None:
        if access is Access.OPEN:
            return None
        presented = _bearer(metadata)
        is_admin = self._admin is not None and presented is not None and hmac.compare_digest(presented, self._admin)
        is_user = self._token is not None and presented is not None and hmac.compare_digest(presented, self._token)
        if access is Access.GENERATE:
            if self._token is None and self._admin is None:
                return None
            if is_admin or is_user:
                return None
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")
        if self._admin is None:
            if self._trust_loopback and is_loopback(peer):
                return None
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, self._no_admin)
        if is_admin:
            return None
        if is_user:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, "this call needs the admin token")
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, "a valid admin bearer token is required")

    def log_refusal(self, method: str, refusal: Refusal) -> None:
        """One line per reason per `REFUSAL_LOG_EVERY_S` at most, with how many like it were not written: a
        client that retries with a wrong token cannot flood the log (issue 21, item 10)."""
        suppressed = self._refusals.allow((refusal.code, refusal.message))
        if suppressed is None:
            return
        more = f" ({suppressed} more like it since the last such line, not logged)" if suppressed else ""
        log.info("%s refused: %s: %s%s", method, refusal.code.name, refusal.message, more)


# At most one log line per refusal reason in this many seconds.
REFUSAL_LOG_EVERY_S = 10.0


class _Throttle:
    """Per key: the first event, then at most one per `every_s`; `allow` says how many were held back since the
    last one let through (None: hold this one back too). Keys are a handful of fixed reasons."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every_s
        self._clock = clock
        self._last: dict[object, float] = {}
        self._held: dict[object, int] = {}

    def allow(self, key: object) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


def _secret(token: str | None) -> bytes | None:
    return token.encode() if token else None


def _bearer(metadata: tuple[tuple[str, str | bytes], ...]) -> bytes | None:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            if scheme.lower() == "bearer" and credential:
                return credential.strip().encode("latin-1", "replace")
    return None


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Checks every call on the way in, and counts it by its final status on the way out (`calls`, labelled
    method and code: refusals included)."""

    def __init__(self, security: Security, calls: Counter) -> None:
        self._gate = Gate(security)
        self._calls = calls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED
        method: str = details.method
        access = access_of(method)
        if access is Access.OPEN:
            # Health and reflection are not ours, but garbage sent to them is answered as to ours.
            return lenient_handler(handler)
        if access is None:
            # `check_served` stops the start before this can happen; should a method slip past it, it is refused
            # rather than guessed at. UNIMPLEMENTED, not PERMISSION_DENIED: no credential would let the call
            # through, and to the client it is a method this server does not offer.
            log.error("%s refused: the access check cannot guard it (server/api/access.py)", method)
            return _unguardable(handler)
        metadata = tuple(details.invocation_metadata or ())
        return _guarded(handler, _Call(method, self._gate, access, metadata, self._calls))


@dataclass(frozen=True)
class _Call:
    method: str
    gate: Gate
    access: Access
    metadata: tuple[tuple[str, str | bytes], ...]
    calls: Counter

    async def admit(self, request: Any, context: grpc.aio.ServicerContext, *, streamed: bool) -> Any:
        """The call's request, or its stream of requests, once its credentials passed: from the metadata,
        before a message of a stream is read. A message that is not valid protobuf ends the call
        (INVALID_ARGUMENT) where it is read."""
        refusal = self.gate.refusal(self.access, self.metadata, context.peer())
        if refusal is not None:
            self.gate.log_refusal(self.method, refusal)
            await context.abort(refusal.code, refusal.message)
        if streamed:
            return _parsed(request, context)
        await reject(request, context)
        return request

    def count(self, context: grpc.aio.ServicerContext, error: BaseException | None, *, answered: bool = False) -> None:
        if error is None:
            code = "OK"
        elif answered and isinstance(error, asyncio.CancelledError | GeneratorExit):
            code = "OK"  # the client had its whole answer; closing the stream early is its own business
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            code = "CANCELLED"  # the client went away (or could not take a message)
        else:
            status = context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        self.calls.labels(self.method.rsplit("/", 1)[-1], code).inc()


# Streaming calls in progress (by their context's id, for as long as the call holds the context), and whether
# each has sent its whole answer (`mark_answered`).
_answered: dict[int, bool] = {}


def mark_answered(context: grpc.aio.ServicerContext) -> None:
    """Say that a streaming call has sent everything its client asked for (a Generate's last image): it counts
    as OK however it ends now. A client that stops reading once it holds its last image (a `break` in a loop)
    cancels the call before its status arrives, and would otherwise be counted CANCELLED (issue 20)."""
    if id(context) in _answered:
        _answered[id(context)] = True


def _unguardable(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that ends every call with UNIMPLEMENTED, reading nothing of the request."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not served")

    make = HANDLER_KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, response_serializer=handler.response_serializer)


async def _parsed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        await reject(request, context)
        yield request


def _guarded(handler: grpc.RpcMethodHandler, call: _Call) -> grpc.RpcMethodHandler:
    """`handler` behind the gate, of any of the four kinds, with its requests parsed leniently."""
    kind = (bool(handler.request_streaming), bool(handler.response_streaming))
    behaviour = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[kind]
    deserialize = lenient(handler.request_deserializer, call.method.rsplit("/", 1)[-1] + "Request")
    streamed = kind[0]
    if kind[1]:

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            error: BaseException | None = None
            _answered[id(context)] = False
            try:
                admitted = await call.admit(request, context, streamed=streamed)
                async for response in behaviour(admitted, context):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                call.count(context, error, answered=_answered.pop(id(context), False))

        return HANDLER_KINDS[kind](
            streaming, request_deserializer=deserialize, response_serializer=handler.response_serializer
        )

    async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
        error: BaseException | None = None
        try:
            return await behaviour(await call.admit(request, context, streamed=streamed), context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.count(context, error)

    return HANDLER_KINDS[kind](
        single, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )
