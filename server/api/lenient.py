"""Wrappers of gRPC method handlers that parse requests leniently: a request that is not valid protobuf ends its
call with INVALID_ARGUMENT naming the message type, where gRPC itself answers UNKNOWN and logs an ERROR traceback
for every such request (issue 21, item 10, for health and reflection; issue 13 for ours)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class Malformed:
    """Stands in for a request that did not parse, so the call can end with INVALID_ARGUMENT."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def lenient(deserialize: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError):
            return Malformed(type_name)

    return parse


def _type_name(deserialize: Callable[[bytes], Any] | None, fallback: str) -> str:
    """The message class a generated deserializer (`Message.FromString`) belongs to."""
    return str(getattr(getattr(deserialize, "__self__", None), "__name__", fallback))


async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.type_name}")


async def _answer(result: Any, context: grpc.aio.ServicerContext) -> Any:
    """A behaviour's result: awaited (an answer, or a stream written through `context`), or its stream written."""
    if inspect.isawaitable(result):
        return await result
    if hasattr(result, "__aiter__"):
        async for response in result:
            await context.write(response)
        return None
    return result


def lenient_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its requests parsed leniently: one that is not valid protobuf ends the call with
    INVALID_ARGUMENT naming its type, not with UNKNOWN and an ERROR traceback in the log per call (gRPC's own
    answer). For health and reflection, whose behaviours answer, stream or write through their context."""
    kind = (bool(handler.request_streaming), bool(handler.response_streaming))
    deserialize = lenient(handler.request_deserializer, _type_name(handler.request_deserializer, "request"))
    behavior = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[kind]
    if deserialize is None or behavior is None:
        return handler

    async def one(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await reject(request, context)
        return await _answer(behavior(request, context), context)

    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                await reject(request, context)
                yield request

        return await _answer(behavior(checked(), context), context)

    make = HANDLER_KINDS[kind]
    return make(
        stream if kind[0] else one, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )


HANDLER_KINDS = {  # (request streaming, response streaming)
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class LenientInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Every method of a server parsed leniently (the health-only port; the main port's gate does it there)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return None if handler is None else lenient_handler(handler)
