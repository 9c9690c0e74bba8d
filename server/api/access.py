"""Who may call what, checked before any servicer runs: one server interceptor.

- Health and reflection are open (probes and tools need them).
- Generation and status (`Generate`, `GetStatus`, `ListModels`) need `authorization: Bearer <token>` when a
  generation or an admin token is configured; either token is accepted.
- Administration (pull, verify, pin, unpin, delete, `PinPair`, `UnpinPair`) needs the admin token when one is
  configured; without one it is allowed only from loopback, and the server says so at start-up.
- Missing or wrong credentials are UNAUTHENTICATED; a valid generation token on an administrative call is
  PERMISSION_DENIED, as gRPC defines them. Tokens are compared in constant time and never logged or echoed.

The same interceptor turns a request that is not valid protobuf into INVALID_ARGUMENT naming the message type,
with no traceback (gRPC itself answers UNKNOWN and logs an error for every such request).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.settings import Security

log = logging.getLogger(__name__)

_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.")
ADMIN_METHODS = frozenset(
    {
        "/refinery.v1.ModelService/PullModel",
        "/refinery.v1.ModelService/DeleteModel",
        "/refinery.v1.ModelService/PinModel",
        "/refinery.v1.ModelService/UnpinModel",
        "/refinery.v1.ModelService/VerifyModel",
        "/refinery.v1.ServerService/PinPair",
        "/refinery.v1.ServerService/UnpinPair",
    }
)


class Access(Enum):
    OPEN = "open"
    GENERATE = "generate"
    ADMIN = "admin"


def access_of(method: str) -> Access:
    if method.startswith(_OPEN_SERVICES):
        return Access.OPEN
    return Access.ADMIN if method in ADMIN_METHODS else Access.GENERATE


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str


def is_loopback(peer: str) -> bool:
    """gRPC's peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path") names a local caller."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gate:
    """The decision for one call, from its method, its metadata and its peer."""

    def __init__(self, security: Security) -> None:
        self._token = _secret(security.token)
        self._admin = _secret(security.admin_token)

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
            if is_loopback(peer):
                return None
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                "administration is allowed only from the server's own machine (no admin token is configured)",
            )
        if is_admin:
            return None
        if is_user:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, "this call needs the admin token")
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, "a valid admin bearer token is required")


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


class _Malformed:
    """Stands in for a request that did not parse, so the call can end with INVALID_ARGUMENT."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _lenient(deserialize: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError):
            return _Malformed(type_name)

    return parse


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, security: Security) -> None:
        self._gate = Gate(security)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or handler.request_streaming or access_of(method) is Access.OPEN:
            # Unknown methods get UNIMPLEMENTED from gRPC; health and reflection are open and are not ours
            # (health's Watch writes through its context rather than yielding).
            return handler
        metadata = tuple(details.invocation_metadata or ())
        return _guarded(handler, method, self._gate, access_of(method), metadata)


async def _check(
    request: Any, context: grpc.aio.ServicerContext, method: str, gate: Gate, access: Access, metadata: Any
) -> None:
    refusal = gate.refusal(access, metadata, context.peer())
    if refusal is not None:
        log.info("%s refused: %s: %s", method, refusal.code.name, refusal.message)
        await context.abort(refusal.code, refusal.message)
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.type_name}")


def _guarded(
    handler: grpc.RpcMethodHandler, method: str, gate: Gate, access: Access, metadata: Any
) -> grpc.RpcMethodHandler:
    type_name = method.rsplit("/", 1)[-1] + "Request"
    deserialize = _lenient(handler.request_deserializer, type_name)
    if handler.response_streaming:
        stream = handler.unary_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _check(request, context, method, gate, access, metadata)
            async for response in stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            streaming, request_deserializer=deserialize, response_serializer=handler.response_serializer
        )
    unary = handler.unary_unary

    async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _check(request, context, method, gate, access, metadata)
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        single, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )
