"""`AsyncClient`: `Client` for asyncio (grpc.aio), with the same events, errors, chunk reassembly and
metadata.

    async with AsyncClient("localhost:50051") as client:
        async for event in client.generate("a lighthouse at dusk", steps=20, refiner=Refiner()):
            ...
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Unpack

import grpc

from refinery.client.channel import DEFAULT_MAX_RECEIVE_BYTES, TLS, open_aio_channel
from refinery.client.chunks import ImageAssembler
from refinery.client.client import DEFAULT_TARGET, target_from_env, token_from_env
from refinery.client.errors import from_rpc_error
from refinery.client.events import Event, to_event
from refinery.client.metadata import generate_metadata
from refinery.client.request import GenerateOptions, generate_request
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc


class AsyncClient:
    """A connection to one Refinery server, for one event loop; see `Client` for the arguments."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TLS | None = None,
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
    ) -> None:
        self._channel = open_aio_channel(target, tls=tls, max_receive_bytes=max_receive_bytes)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated
        self._token = token
        self._max_receive_bytes = max_receive_bytes

    @classmethod
    def from_env(
        cls, target: str | None = None, *, tls: TLS | None = None, max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES
    ) -> AsyncClient:
        return cls(target_from_env(target), token=token_from_env(), tls=tls, max_receive_bytes=max_receive_bytes)

    def generate(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncGenerator[Event, None]:
        return self.stream(generate_request(prompt, **options), timeout=timeout)

    # `timeout` is a gRPC deadline: the server learns it and stops the job when it passes, which an
    # asyncio.timeout around the loop would not do.
    async def stream(
        self,
        request: pb.GenerateRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncGenerator[Event, None]:
        call = self._stub.Generate(request, timeout=timeout, metadata=generate_metadata(request, self._token))
        assembler = ImageAssembler()
        request_id = request.request_id
        try:
            async for response in call:
                request_id = response.request_id or request_id
                event = to_event(response, assembler.feed(response))
                if event is not None:
                    yield event
            assembler.finish()
        except grpc.RpcError as error:  # grpc.aio.AioRpcError reads its status and trailers without awaiting
            raise from_rpc_error(error, receive_limit=self._max_receive_bytes, request_id=request_id) from error
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()
