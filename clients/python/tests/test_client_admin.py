"""Client's model and server service methods against the scripted server on loopback: typed values from the
responses, progress as it streams, the request and token the server sees, and failures as RefineryError."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from google.rpc import status_pb2 as rpc_status_pb2
from scripted_server import FakeServer, failure

from refinery.client import (
    Architecture,
    Client,
    CompiledShape,
    CompileState,
    DeviceStatus,
    FieldViolation,
    ModelInfo,
    ModelList,
    PinFailure,
    PullProgress,
    QueueStatus,
    RefineryError,
    ResidentPair,
    Role,
    ServerStatus,
    Verdict,
    VerifyResult,
)
from refinery.v1 import generation_pb2
from refinery.v1 import models_pb2 as pb
from refinery.v1 import status_pb2 as status_pb

BASE = "civitai:101055@128078"
REFINER = "civitai:101055@128080"
ADDED = datetime(2026, 11, 26, 11, 49, tzinfo=UTC)
USED = datetime(2026, 12, 1, 15, 2, 11, tzinfo=UTC)


def info_pb(model: str = BASE, *, pinned: bool = False) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=model,
        size_bytes=6_900_000_000,
        architecture=pb.ARCHITECTURE_SDXL_BASE,
        added=timestamp_pb2.Timestamp(seconds=int(ADDED.timestamp())),
        last_used=timestamp_pb2.Timestamp(seconds=int(USED.timestamp())),
        pinned=pinned,
        resident=True,
        sha256="ab" * 32,
        in_use=False,
    )


def info(model: str = BASE, *, pinned: bool = False) -> ModelInfo:
    return ModelInfo(model, 6_900_000_000, Architecture.SDXL_BASE, ADDED, USED, pinned, True, "ab" * 32, False)


def device_pb() -> status_pb.DeviceStatus:
    pair = status_pb.ResidentPair(
        model=BASE,
        refiner_model=REFINER,
        bytes=9_000_000_000,
        active_jobs=1,
        pinned=True,
        last_used=timestamp_pb2.Timestamp(seconds=int(USED.timestamp())),
    )
    shape = status_pb.CompiledShape(
        model=BASE,
        role=generation_pb2.MODEL_ROLE_BASE,
        width=1024,
        height=1024,
        max_images=4,
        state=status_pb.CompiledShape.STATE_READY,
        compile_time=duration_pb2.Duration(seconds=42),
    )
    return status_pb.DeviceStatus(
        name="cuda:0",
        budget_bytes=60_000_000_000,
        resident_bytes=9_000_000_000,
        allocated_bytes=9_500_000_000,
        pairs=[pair],
        jobs_running=1,
        tuning="compiled",
        compiled_shapes=[shape],
        compiled_unet_calls=30,
        eager_unet_calls=2,
        busy_time=duration_pb2.Duration(seconds=90),
    )


DEVICE = DeviceStatus(
    "cuda:0",
    60_000_000_000,
    9_000_000_000,
    9_500_000_000,
    (ResidentPair(BASE, REFINER, 9_000_000_000, 1, True, USED),),
    1,
    "compiled",
    (CompiledShape(BASE, Role.BASE, 1024, 1024, 4, CompileState.READY, False, timedelta(seconds=42), ""),),
    30,
    2,
    timedelta(seconds=90),
)


def not_found(field: str) -> rpc_status_pb2.Status:
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description="not in the cache")
    return failure(
        grpc.StatusCode.NOT_FOUND,
        f"{field}: not in the cache",
        error_details_pb2.BadRequest(field_violations=[violation]),
    )


def test_pull_streams_progress_then_the_model_and_sends_the_admin_token(fake: FakeServer) -> None:
    fake.admin.answers["PullModel"] = [
        pb.PullModelResponse(progress=pb.PullProgress(model=BASE, bytes_done=0, bytes_total=100, file="m.safetensors")),
        pb.PullModelResponse(
            progress=pb.PullProgress(
                model=BASE, bytes_done=100, bytes_total=100, bytes_per_second=5e7, bytes_transferred=60
            )
        ),
        pb.PullModelResponse(model=info_pb(pinned=True)),
    ]

    with Client(fake.target, token="gen", admin_token="adm") as client:
        events = list(client.pull_model(BASE, pin=True))

    assert events == [
        PullProgress(BASE, 0, 100, 0.0, False, "m.safetensors", None),  # unset: the server did not say
        PullProgress(BASE, 100, 100, 5e7, False, "", 60),
        info(pinned=True),
    ]
    (call,) = fake.admin.calls
    assert (call.method, call.request) == ("PullModel", pb.PullModelRequest(model=BASE, pin=True))
    assert call.metadata["authorization"] == "Bearer adm"


def test_stopping_a_pull_early_cancels_it_on_the_server(fake: FakeServer) -> None:
    fake.admin.answers["PullModel"] = [pb.PullModelResponse(progress=pb.PullProgress(model=BASE, bytes_done=1))]
    fake.admin.hold = True

    with Client(fake.target) as client:
        pulling = client.pull_model(BASE)
        assert next(pulling) == PullProgress(BASE, 1, 0, 0.0)
        pulling.close()  # what leaving a `for` early does

    assert fake.admin.calls[0].cancelled.wait(30)


def test_a_pull_that_fails_midway_raises_with_the_code_after_its_progress(fake: FakeServer) -> None:
    fake.admin.answers["PullModel"] = [pb.PullModelResponse(progress=pb.PullProgress(model=BASE, bytes_done=7))]
    fake.admin.failure = failure(grpc.StatusCode.UNAVAILABLE, "civitai.com cannot be reached")

    seen = []
    with Client(fake.target) as client, pytest.raises(RefineryError) as caught:
        seen.extend(client.pull_model(BASE))

    assert seen == [PullProgress(BASE, 7, 0, 0.0)]
    assert (caught.value.code, caught.value.message) == (grpc.StatusCode.UNAVAILABLE, "civitai.com cannot be reached")


def test_list_sends_the_generation_token_and_reads_every_model(fake: FakeServer) -> None:
    unknown = pb.ModelInfo(model="hf:a/b", architecture=99)  # an architecture added after this client
    fake.admin.answers["ListModels"] = [
        pb.ListModelsResponse(models=[info_pb(), unknown], total_bytes=7_000_000_000, quota_bytes=0)
    ]

    with Client(fake.target, token="gen", admin_token="adm") as client:
        listed = client.list_models(timeout=30)

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    other = ModelInfo("hf:a/b", 0, Architecture.UNSPECIFIED, epoch, epoch, False, False, "", False)
    assert listed == ModelList((info(), other), 7_000_000_000, 0)
    assert fake.admin.calls[0].metadata["authorization"] == "Bearer gen"


def test_pin_unpin_and_delete_return_what_the_server_answered(fake: FakeServer) -> None:
    fake.admin.answers["PinModel"] = [pb.PinModelResponse(model=info_pb(pinned=True))]
    fake.admin.answers["UnpinModel"] = [pb.UnpinModelResponse(model=info_pb())]
    fake.admin.answers["DeleteModel"] = [pb.DeleteModelResponse(freed_bytes=8_600_000)]

    with Client(fake.target, token="only") as client:  # one token: administration sends it too
        assert client.pin_model(BASE) == info(pinned=True)
        assert client.unpin_model(BASE) == info()
        assert client.delete_model(REFINER) == 8_600_000

    assert [(c.method, c.request) for c in fake.admin.calls] == [
        ("PinModel", pb.PinModelRequest(model=BASE)),
        ("UnpinModel", pb.UnpinModelRequest(model=BASE)),
        ("DeleteModel", pb.DeleteModelRequest(model=REFINER)),
    ]
    assert {c.metadata["authorization"] for c in fake.admin.calls} == {"Bearer only"}


def test_a_refused_call_names_its_field(fake: FakeServer) -> None:
    fake.admin.failure = not_found("model")

    with Client(fake.target) as client, pytest.raises(RefineryError) as caught:
        client.delete_model("civitai:1@2")

    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.field_violations == (FieldViolation("model", "not in the cache"),)
    assert "authorization" not in fake.admin.calls[0].metadata  # no token given, none sent


def test_verify_streams_progress_and_one_result_per_model(fake: FakeServer) -> None:
    fake.admin.answers["VerifyModel"] = [
        pb.VerifyModelResponse(progress=pb.PullProgress(model=BASE, bytes_done=50, bytes_total=100, verifying=True)),
        pb.VerifyModelResponse(
            result=pb.VerifyResult(model=BASE, verdict=pb.VerifyResult.VERDICT_INTACT, bytes_checked=100)
        ),
        pb.VerifyModelResponse(
            result=pb.VerifyResult(
                model=REFINER, verdict=pb.VerifyResult.VERDICT_CORRUPT, message="unet: SHA256 differs"
            )
        ),
    ]

    with Client(fake.target, admin_token="adm") as client:
        events = list(client.verify_model())

    assert events == [
        PullProgress(BASE, 50, 100, 0.0, verifying=True),
        VerifyResult(BASE, Verdict.INTACT, 100, ""),
        VerifyResult(REFINER, Verdict.CORRUPT, 0, "unet: SHA256 differs"),
    ]
    (call,) = fake.admin.calls
    assert (call.request, call.metadata["authorization"]) == (pb.VerifyModelRequest(model=""), "Bearer adm")


def test_status_reads_devices_pairs_queue_and_pin_failures(fake: FakeServer) -> None:
    broken = rpc_status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="damaged, offline")
    fake.admin.answers["GetStatus"] = [
        status_pb.GetStatusResponse(
            devices=[device_pb()],
            queue=status_pb.QueueStatus(depth=3, max_queue=64, depth_by_priority={0: 2, 10: 1}),
            jobs_running=1,
            pin_failures=[status_pb.PinFailure(model="hf:x/y", error=broken)],
        )
    ]

    with Client(fake.target, token="gen", admin_token="adm") as client:
        status = client.status()

    assert status == ServerStatus(
        (DEVICE,),
        QueueStatus(3, 64, {0: 2, 10: 1}),
        1,
        (PinFailure("hf:x/y", "", grpc.StatusCode.UNAVAILABLE, "damaged, offline"),),
    )
    assert fake.admin.calls[0].metadata["authorization"] == "Bearer gen"


def test_pin_and_unpin_pair_send_the_pair_its_header_and_the_admin_token(fake: FakeServer) -> None:
    fake.admin.answers["PinPair"] = [status_pb.PinPairResponse(devices=[device_pb()])]
    fake.admin.answers["UnpinPair"] = [status_pb.UnpinPairResponse()]

    with Client(fake.target, token="gen", admin_token="adm") as client:
        assert client.pin_pair(BASE, REFINER) == (DEVICE,)
        assert client.unpin_pair(BASE) == ()

    pin, unpin = fake.admin.calls
    assert pin.request == status_pb.PinPairRequest(model=BASE, refiner_model=REFINER)
    assert unpin.request == status_pb.UnpinPairRequest(model=BASE)
    assert (pin.metadata["refinery-pair"], unpin.metadata["refinery-pair"]) == (f"{BASE}+{REFINER}", f"{BASE}+")
    assert {pin.metadata["authorization"], unpin.metadata["authorization"]} == {"Bearer adm"}


def test_from_env_sends_the_admin_token_for_administration(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFINERY_TOKEN", "gen")
    monkeypatch.setenv("REFINERY_ADMIN_TOKEN", "adm")
    fake.admin.answers["ListModels"] = [pb.ListModelsResponse()]
    fake.admin.answers["DeleteModel"] = [pb.DeleteModelResponse()]

    with Client.from_env(fake.target) as client:
        client.list_models()
        client.delete_model(BASE)

    assert [c.metadata["authorization"] for c in fake.admin.calls] == ["Bearer gen", "Bearer adm"]
