"""`Client`: Refinery's Generate as a Python iterator of typed events (`AsyncClient` in aio.py is the same for
asyncio).

    with Client("localhost:50051") as client:
        for event in client.generate("a lighthouse at dusk", steps=20, seed=7, refiner=Refiner()):
            if isinstance(event, Image):
                Path(f"lighthouse-{event.index}.png").write_bytes(event.data)

Every failure is a `RefineryError` (errors.py). Results sent in chunks are reassembled (chunks.py), the
pair-affinity header and the bearer token are sent on every call (metadata.py), and the channel's receive
limit fits any image (channel.py).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from types import TracebackType
from typing import Unpack

import grpc

from refinery.client.channel import DEFAULT_MAX_RECEIVE_BYTES, TLS, open_channel
from refinery.client.chunks import ImageAssembler
from refinery.client.errors import from_rpc_error
from refinery.client.events import Event, to_event
from refinery.client.metadata import generate_metadata
from refinery.client.request import GenerateOptions, generate_request
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"


def token_from_env(*, admin: bool = False) -> str | None:
    """The token for generation (REFINERY_TOKEN) or for administration (REFINERY_ADMIN_TOKEN), if set."""
    return os.environ.get("REFINERY_ADMIN_TOKEN" if admin else "REFINERY_TOKEN") or None


def target_from_env(target: str | None = None) -> str:
    """`target`, else REFINERY_SERVER, else localhost:50051."""
    return target or os.environ.get("REFINERY_SERVER") or DEFAULT_TARGET


class Client:
    """A connection to one Refinery server (or balancer). Thread-safe; close it, or use it as a context manager.

    `token` is sent as `authorization: Bearer <token>` on every call; without `tls` it crosses the network in
    the clear, so use TLS beyond loopback. `max_receive_bytes` bounds every message the server may send; a
    bigger one fails the call with RESOURCE_EXHAUSTED saying so.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TLS | None = None,
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
    ) -> None:
        self._channel = open_channel(target, tls=tls, max_receive_bytes=max_receive_bytes)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated
        self._token = token
        self._max_receive_bytes = max_receive_bytes

    @classmethod
    def from_env(
        cls, target: str | None = None, *, tls: TLS | None = None, max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES
    ) -> Client:
        """The server from `target`, else REFINERY_SERVER, else localhost:50051; the token from REFINERY_TOKEN."""
        return cls(target_from_env(target), token=token_from_env(), tls=tls, max_receive_bytes=max_receive_bytes)

    def generate(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Generator[Event, None, None]:
        """Run one request and yield its events as they happen; the options are GenerateRequest's fields
        (request.py). `timeout` is in seconds, for the whole call. Stopping the iteration early (a `break`)
        cancels the request on the server."""
        return self.stream(generate_request(prompt, **options), timeout=timeout)

    def stream(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> Generator[Event, None, None]:
        """`generate` for a GenerateRequest built by hand."""
        call = self._stub.Generate(request, timeout=timeout, metadata=generate_metadata(request, self._token))
        assembler = ImageAssembler()
        request_id = request.request_id
        try:
            for response in call:
                request_id = response.request_id or request_id
                event = to_event(response, assembler.feed(response))
                if event is not None:
                    yield event
            assembler.finish()
        except grpc.RpcError as error:
            raise from_rpc_error(error, receive_limit=self._max_receive_bytes, request_id=request_id) from error
        finally:
            call.cancel()  # nothing once the call has ended; stops the job if the caller stopped listening

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
