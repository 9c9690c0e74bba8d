"""AsyncClient against the scripted server: the same events, chunk reassembly, metadata and errors as Client."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from google.rpc import error_details_pb2
from scripted_server import FakeServer, failure

from refinery.client import AsyncClient, Event, FieldViolation, Image, Queued, Refiner, RefineryError
from refinery.v1 import generation_pb2 as pb

RID = "aio-req"
MiB = 1 << 20


def response(**event: object) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=RID, **event)


def test_events_with_a_chunked_image_and_the_metadata(fake: FakeServer) -> None:
    big = os.urandom(4 * MiB)
    meta = pb.Image(index=0, mime_type="image/png", seed=11, width=2048, height=2048, base_steps=30)
    fake.service.script = [
        response(queued=pb.Queued(position=0, queue_depth=1)),
        response(image_chunk=pb.ImageChunk(index=0, offset=0, total_size=len(big), data=big[: 3 * MiB])),
        response(
            image_chunk=pb.ImageChunk(index=0, offset=3 * MiB, total_size=len(big), data=big[3 * MiB :], image=meta)
        ),
    ]

    async def run() -> list[Event]:
        async with AsyncClient(fake.target, token="t0k") as client:
            return [event async for event in client.generate("x", model="m", refiner=Refiner("r"), steps=30)]

    assert asyncio.run(run()) == [
        Queued(RID, 0, 1),
        Image(RID, 0, big, "image/png", 11, 2048, 2048, 30, 0, "", ""),
    ]
    (call,) = fake.service.calls
    assert (call.metadata["refinery-pair"], call.metadata["authorization"]) == ("m+r", "Bearer t0k")
    assert (call.request.steps, call.request.refiner.model) == (30, "r")


def test_a_bad_request_names_its_fields(fake: FakeServer) -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="steps", description="must be in 1..150")
    bad = error_details_pb2.BadRequest(field_violations=[violation])
    fake.service.failure = failure(grpc.StatusCode.INVALID_ARGUMENT, "steps: must be in 1..150", bad)

    async def run() -> None:
        async with AsyncClient(fake.target) as client:
            async for _ in client.generate("x", steps=500):
                pass

    with pytest.raises(RefineryError) as caught:
        asyncio.run(run())
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field_violations == (FieldViolation("steps", "must be in 1..150"),)


def test_stopping_early_cancels_the_request_on_the_server(fake: FakeServer) -> None:
    fake.service.script = [response(queued=pb.Queued(position=0, queue_depth=1))]
    fake.service.hold = True

    async def run() -> Event:
        async with AsyncClient(fake.target) as client:
            events = client.generate("x")
            first = await anext(events)
            await events.aclose()  # what leaving an `async for` early does
            return first

    assert asyncio.run(run()) == Queued(RID, 0, 1)
    assert fake.service.calls[0].cancelled.wait(30)
