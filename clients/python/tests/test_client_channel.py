"""The channel helpers every client opens its channel with (and the `refinery` command its plain stubs'): the
receive limit, TLS, and interceptors on the asyncio channel."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from scripted_server import FakeServer

from refinery.client import TLS
from refinery.client.channel import open_aio_channel, open_channel
from refinery.client.metadata import auth_metadata
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc


class _Header(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *auth_metadata("s3cret"))
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(details, request)


def test_the_aio_channel_runs_its_interceptors(fake: FakeServer) -> None:
    fake.service.script = [pb.GenerateResponse(request_id="r")]

    async def run() -> list[pb.GenerateResponse]:
        async with open_aio_channel(fake.target, interceptors=[_Header()]) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
            return [r async for r in stub.Generate(pb.GenerateRequest(positive_prompt="x"))]

    assert [r.request_id for r in asyncio.run(run())] == ["r"]
    (call,) = fake.service.calls
    assert call.metadata["authorization"] == "Bearer s3cret"


def test_the_blocking_channel_keeps_its_receive_limit(fake: FakeServer) -> None:
    fake.service.script = [pb.GenerateResponse(request_id="x" * 4096)]
    channel = open_channel(fake.target, max_receive_bytes=1024)
    try:
        stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(positive_prompt="x")))
    finally:
        channel.close()
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_both_channels_speak_mutual_tls(mtls_fake: FakeServer, certificates: Any) -> None:
    tls = TLS.from_files(certificates.ca, certificates.client_cert, certificates.client_key)
    mtls_fake.service.script = [pb.GenerateResponse(request_id="t")]
    channel = open_channel(mtls_fake.target, tls=tls)
    try:
        stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        assert [r.request_id for r in stub.Generate(pb.GenerateRequest(positive_prompt="x"))] == ["t"]
    finally:
        channel.close()

    async def run() -> list[str]:
        async with open_aio_channel(mtls_fake.target, tls=tls) as aio_channel:
            stub = pb_grpc.GenerationServiceStub(aio_channel)  # type: ignore[no-untyped-call]
            return [r.request_id async for r in stub.Generate(pb.GenerateRequest(positive_prompt="x"))]

    assert asyncio.run(run()) == ["t"]
