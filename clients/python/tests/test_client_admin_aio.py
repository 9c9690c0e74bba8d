"""AsyncClient's model and server service methods against the scripted server: the same values, tokens and
errors as Client's (test_client_admin.py), through grpc.aio."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from scripted_server import FakeServer, failure
from test_client_admin import BASE, DEVICE, REFINER, device_pb, info, info_pb, not_found

from refinery.client import (
    AsyncClient,
    FieldViolation,
    ModelList,
    PullEvent,
    PullProgress,
    QueueStatus,
    RefineryError,
    ServerStatus,
    Verdict,
    VerifyEvent,
    VerifyResult,
)
from refinery.v1 import models_pb2 as pb
from refinery.v1 import status_pb2 as status_pb


def test_pull_and_verify_stream_their_events_with_the_admin_token(fake: FakeServer) -> None:
    fake.admin.answers["PullModel"] = [
        pb.PullModelResponse(progress=pb.PullProgress(model=BASE, bytes_done=10, bytes_total=20, bytes_transferred=10)),
        pb.PullModelResponse(model=info_pb()),
    ]
    fake.admin.answers["VerifyModel"] = [
        pb.VerifyModelResponse(
            result=pb.VerifyResult(model=BASE, verdict=pb.VerifyResult.VERDICT_REPAIRED, message="x")
        )
    ]

    async def run() -> tuple[list[PullEvent], list[VerifyEvent]]:
        async with AsyncClient(fake.target, token="gen", admin_token="adm") as client:
            pulled = [event async for event in client.pull_model(BASE)]
            verified = [event async for event in client.verify_model(BASE)]
            return pulled, verified

    pulled, verified = asyncio.run(run())
    assert pulled == [PullProgress(BASE, 10, 20, 0.0, bytes_transferred=10), info()]
    assert verified == [VerifyResult(BASE, Verdict.REPAIRED, 0, "x")]
    assert [c.metadata["authorization"] for c in fake.admin.calls] == ["Bearer adm", "Bearer adm"]
    assert fake.admin.calls[0].request == pb.PullModelRequest(model=BASE)


def test_unary_calls_return_the_same_values_as_the_blocking_client(fake: FakeServer) -> None:
    fake.admin.answers["ListModels"] = [pb.ListModelsResponse(models=[info_pb()], total_bytes=5, quota_bytes=9)]
    fake.admin.answers["PinModel"] = [pb.PinModelResponse(model=info_pb(pinned=True))]
    fake.admin.answers["UnpinModel"] = [pb.UnpinModelResponse(model=info_pb())]
    fake.admin.answers["DeleteModel"] = [pb.DeleteModelResponse(freed_bytes=3)]
    fake.admin.answers["GetStatus"] = [status_pb.GetStatusResponse(devices=[device_pb()])]
    fake.admin.answers["PinPair"] = [status_pb.PinPairResponse(devices=[device_pb()])]
    fake.admin.answers["UnpinPair"] = [status_pb.UnpinPairResponse(devices=[device_pb()])]

    async def run() -> tuple[object, ...]:
        async with AsyncClient(fake.target, token="gen", admin_token="adm") as client:
            return (
                await client.list_models(),
                await client.pin_model(BASE),
                await client.unpin_model(BASE),
                await client.delete_model(BASE),
                await client.status(timeout=30),
                await client.pin_pair(BASE, REFINER),
                await client.unpin_pair(BASE, REFINER),
            )

    status = ServerStatus((DEVICE,), QueueStatus(0, 0, {}), 0, ())
    assert asyncio.run(run()) == (
        ModelList((info(),), 5, 9),
        info(pinned=True),
        info(),
        3,
        status,
        (DEVICE,),
        (DEVICE,),
    )
    tokens = [c.metadata["authorization"].removeprefix("Bearer ") for c in fake.admin.calls]
    assert tokens == ["gen", "adm", "adm", "adm", "gen", "adm", "adm"]
    assert fake.admin.calls[-2].metadata["refinery-pair"] == f"{BASE}+{REFINER}"


def test_a_refused_call_is_a_refinery_error_with_its_field(fake: FakeServer) -> None:
    fake.admin.failure = not_found("model")

    async def run() -> None:
        async with AsyncClient(fake.target) as client:
            await client.pin_model("civitai:1@2")

    with pytest.raises(RefineryError) as caught:
        asyncio.run(run())
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.field_violations == (FieldViolation("model", "not in the cache"),)


def test_a_stream_that_fails_raises_and_one_left_early_is_cancelled(fake: FakeServer) -> None:
    fake.admin.answers["PullModel"] = [pb.PullModelResponse(progress=pb.PullProgress(model=BASE, bytes_done=1))]
    fake.admin.hold = True

    async def leave_early() -> PullEvent:
        async with AsyncClient(fake.target) as client:
            pulling = client.pull_model(BASE)
            first = await anext(pulling)
            await pulling.aclose()
            return first

    assert asyncio.run(leave_early()) == PullProgress(BASE, 1, 0, 0.0)
    assert fake.admin.calls[0].cancelled.wait(30)

    fake.admin.hold = False
    fake.admin.failure = failure(grpc.StatusCode.PERMISSION_DENIED, "administration needs the admin token")

    async def fail() -> None:
        async with AsyncClient(fake.target, token="gen") as client:
            async for _ in client.verify_model():
                pass

    with pytest.raises(RefineryError) as caught:
        asyncio.run(fail())
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
