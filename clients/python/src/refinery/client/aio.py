"""`AsyncClient`: `Client` for asyncio (grpc.aio), with the same events, errors, chunk reassembly and
metadata, and the same model and server service methods (each call described once in _calls.py).

    async with AsyncClient("localhost:50051") as client:
        async for event in client.generate("a lighthouse at dusk", steps=20, refiner=Refiner()):
            ...
        print((await client.list_models()).total_bytes)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import timedelta
from types import TracebackType
from typing import TypeVar, Unpack

import grpc

from refinery.client import _calls
from refinery.client.channel import DEFAULT_MAX_RECEIVE_BYTES, TLS, open_aio_channel
from refinery.client.chunks import ImageAssembler
from refinery.client.client import DEFAULT_TARGET, target_from_env, token_from_env
from refinery.client.errors import from_rpc_error
from refinery.client.events import Event, to_event
from refinery.client.images import ImageSource, UploadedImage, upload_header, upload_requests, uploaded
from refinery.client.metadata import bearer, generate_metadata, pair_metadata
from refinery.client.models import ModelInfo, ModelList, PullEvent, VerifyEvent
from refinery.client.request import GenerateOptions, generate_request, pair_of, to_upload, with_references
from refinery.client.resend import Attempts, OnResend, Resend, identified
from refinery.client.status import DeviceStatus, ServerStatus
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc

R = TypeVar("R")


class AsyncClient:
    """A connection to one Refinery server, for one event loop; see `Client` for the arguments (`resend` and
    `on_resend` included: a resend waits with `asyncio.sleep`)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        tls: TLS | None = None,
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
        resend: Resend | None = Resend(),  # noqa: B008  # frozen: one shared value is safe
        on_resend: OnResend | None = None,
    ) -> None:
        self._channel = open_aio_channel(target, tls=tls, max_receive_bytes=max_receive_bytes)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated
        self._token = token
        self._admin_token = admin_token
        self._max_receive_bytes = max_receive_bytes
        self._resend = resend
        self._on_resend = on_resend
        self._closed = False

    @classmethod
    def from_env(
        cls, target: str | None = None, *, tls: TLS | None = None, max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES
    ) -> AsyncClient:
        token, admin_token = token_from_env(), token_from_env(admin=True)
        return cls(
            target_from_env(target), token=token, admin_token=admin_token, tls=tls, max_receive_bytes=max_receive_bytes
        )

    async def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        **options: Unpack[GenerateOptions],
    ) -> AsyncGenerator[Event, None]:
        request = await self.prepare(prompt, timeout=timeout, **options)
        async for event in self.stream(request, timeout=timeout):
            yield event

    async def prepare(
        self,
        prompt: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        **options: Unpack[GenerateOptions],
    ) -> pb.GenerateRequest:
        model, refiner_model = pair_of(options)
        references = {}
        for field, source in to_upload(options).items():
            stored = await self.upload_image(source, model=model, refiner_model=refiner_model, timeout=timeout)
            references[field] = stored.reference
        return generate_request(prompt, **with_references(options, references))

    async def upload_image(
        self,
        source: ImageSource,
        keep_for: timedelta | float | None = None,
        *,
        model: str = "",
        refiner_model: str = "",
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> UploadedImage:
        # Hashing a large file takes a while: off the event loop. The 64 KiB reads that follow are not worth it.
        header = await asyncio.to_thread(upload_header, source, keep_for)
        metadata = pair_metadata(model, refiner_model, bearer(self._token, self._admin_token, admin=False))
        attempts = Attempts(self._resend, timeout, f"upload sha256:{header.sha256}", self._on_resend)
        while True:
            try:
                response = await self._stub.UploadImage(
                    upload_requests(header, source), timeout=attempts.timeout(), metadata=metadata + attempts.metadata()
                )
                return uploaded(response)
            except grpc.RpcError as error:
                delay = attempts.after(error, answered=False, closed=self._closed)
                if delay is None:
                    raise attempts.note(from_rpc_error(error, receive_limit=self._max_receive_bytes)) from error
            await asyncio.sleep(delay)

    # `timeout` is a gRPC deadline: the server learns it and stops the job when it passes, which an
    # asyncio.timeout around the loop would not do.
    async def stream(
        self,
        request: pb.GenerateRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncGenerator[Event, None]:
        request = identified(request, self._resend)
        token = bearer(self._token, self._admin_token, admin=False)
        attempts = Attempts(self._resend, timeout, request.request_id, self._on_resend)
        while True:
            metadata = generate_metadata(request, token)
            call = self._stub.Generate(request, timeout=attempts.timeout(), metadata=metadata + attempts.metadata())
            assembler = ImageAssembler()
            request_id = request.request_id
            answered = False
            try:
                async for response in call:
                    answered = True
                    request_id = response.request_id or request_id
                    event = to_event(response, assembler.feed(response))
                    if event is not None:
                        yield event
                assembler.finish()
                return
            except grpc.RpcError as error:  # grpc.aio.AioRpcError reads its status and trailers without awaiting
                delay = attempts.after(error, answered=answered, closed=self._closed)
                if delay is None:
                    failure = from_rpc_error(error, receive_limit=self._max_receive_bytes, request_id=request_id)
                    raise attempts.note(failure) from error
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    # ---- the model and server services: as `Client`'s ------------------------------------------------------
    # `timeout` is a gRPC deadline here too, as in `stream`: the server learns it and stops the work.

    def pull_model(
        self, model: str, *, pin: bool = False, timeout: float | None = None
    ) -> AsyncGenerator[PullEvent, None]:
        return self._stream(_calls.pull_model(model, pin), timeout)

    async def list_models(self, *, timeout: float | None = None) -> ModelList:  # noqa: ASYNC109
        return await self._unary(_calls.list_models(), timeout)

    async def pin_model(self, model: str, *, timeout: float | None = None) -> ModelInfo:  # noqa: ASYNC109
        return await self._unary(_calls.pin_model(model), timeout)

    async def unpin_model(self, model: str, *, timeout: float | None = None) -> ModelInfo:  # noqa: ASYNC109
        return await self._unary(_calls.unpin_model(model), timeout)

    async def delete_model(self, model: str, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        return await self._unary(_calls.delete_model(model), timeout)

    def verify_model(self, model: str = "", *, timeout: float | None = None) -> AsyncGenerator[VerifyEvent, None]:
        return self._stream(_calls.verify_model(model), timeout)

    async def status(self, *, timeout: float | None = None) -> ServerStatus:  # noqa: ASYNC109
        return await self._unary(_calls.get_status(), timeout)

    async def pin_pair(
        self,
        model: str,
        refiner_model: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tuple[DeviceStatus, ...]:
        return await self._unary(_calls.pin_pair(model, refiner_model, pin=True), timeout)

    async def unpin_pair(
        self,
        model: str,
        refiner_model: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tuple[DeviceStatus, ...]:
        return await self._unary(_calls.pin_pair(model, refiner_model, pin=False), timeout)

    async def _unary(self, call: _calls.Unary[R], timeout: float | None) -> R:  # noqa: ASYNC109
        invoke = self._channel.unary_unary(
            call.method, request_serializer=_calls.serialize, response_deserializer=call.response.FromString
        )
        metadata = _calls.metadata(call, self._token, self._admin_token)
        try:
            response = await invoke(call.request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error, receive_limit=self._max_receive_bytes) from error
        return call.convert(response)

    async def _stream(
        self,
        call: _calls.Streaming[R],
        timeout: float | None,  # noqa: ASYNC109
    ) -> AsyncGenerator[R, None]:
        invoke = self._channel.unary_stream(
            call.method, request_serializer=_calls.serialize, response_deserializer=call.response.FromString
        )
        responses = invoke(
            call.request, timeout=timeout, metadata=_calls.metadata(call, self._token, self._admin_token)
        )
        try:
            async for response in responses:
                event = call.convert(response)
                if event is not None:
                    yield event
        except grpc.RpcError as error:
            raise from_rpc_error(error, receive_limit=self._max_receive_bytes) from error
        finally:
            responses.cancel()

    async def close(self) -> None:
        self._closed = True  # a call the closing channel cancels is not resent
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()
