"""Client.generate against a scripted server on loopback: typed events in order, images reassembled, the
request and metadata the server sees, and every failure as one RefineryError."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from scripted_server import FakeServer, failure

from refinery.client import (
    TLS,
    Client,
    FieldViolation,
    Image,
    ModelLoading,
    Phase,
    Preview,
    Progress,
    Queued,
    Refiner,
    RefineryError,
    Role,
    Stage,
)
from refinery.v1 import generation_pb2 as pb

RID = "7c1e-req"
MiB = 1 << 20


def response(**event: object) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=RID, **event)


def image_meta(index: int) -> pb.Image:
    return pb.Image(
        index=index,
        mime_type="image/png",
        seed=2**63 + index,
        width=64,
        height=64,
        base_steps=18,
        refiner_steps=2,
        model="builtin:tiny-sdxl-base@1",
        refiner_model="builtin:tiny-sdxl-refiner@1",
    )


def expected_image(index: int, data: bytes) -> Image:
    return Image(
        RID,
        index,
        data,
        "image/png",
        2**63 + index,
        64,
        64,
        18,
        2,
        "builtin:tiny-sdxl-base@1",
        "builtin:tiny-sdxl-refiner@1",
    )


def test_a_refined_generation_arrives_as_typed_events_in_order(fake: FakeServer) -> None:
    big = os.urandom(4 * MiB)  # over 3 MiB: the server sends it in two chunks
    fake.service.script = [
        response(queued=pb.Queued(position=1, queue_depth=2)),
        response(queued=pb.Queued(position=0, queue_depth=1)),
        response(
            model_loading=pb.ModelLoading(
                model="builtin:tiny-sdxl-base@1",
                role=pb.MODEL_ROLE_BASE,
                phase=pb.ModelLoading.PHASE_DOWNLOADING,
                bytes_done=10,
                bytes_total=20,
                bytes_per_second=5.5,
            )
        ),
        response(
            progress=pb.Progress(
                stage=pb.STAGE_REFINER,
                step=2,
                stage_steps=2,
                overall_step=20,
                total_steps=20,
                elapsed=duration_pb2.Duration(seconds=1, nanos=500_000_000),
                image_indices=[0, 1],
            )
        ),
        response(
            preview=pb.Preview(
                stage=pb.STAGE_BASE,
                step=5,
                overall_step=5,
                image_index=1,
                data=b"jpeg",
                mime_type="image/jpeg",
                width=8,
                height=8,
            )
        ),
        response(image=pb.Image(data=b"small", **{f.name: v for f, v in image_meta(1).ListFields()})),
        response(image_chunk=pb.ImageChunk(index=0, offset=0, total_size=len(big), data=big[: 3 * MiB])),
        response(
            image_chunk=pb.ImageChunk(
                index=0, offset=3 * MiB, total_size=len(big), data=big[3 * MiB :], image=image_meta(0)
            )
        ),
    ]
    with Client(fake.target) as client:
        events = list(client.generate("a lighthouse", refiner=Refiner(), seed=7))
    assert events == [
        Queued(RID, 1, 2),
        Queued(RID, 0, 1),
        ModelLoading(RID, "builtin:tiny-sdxl-base@1", Role.BASE, Phase.DOWNLOADING, 10, 20, 5.5),
        Progress(RID, Stage.REFINER, 2, 2, 20, 20, timedelta(seconds=1.5), (0, 1)),
        Preview(RID, Stage.BASE, 5, 5, 1, b"jpeg", "image/jpeg", 8, 8),
        expected_image(1, b"small"),
        expected_image(0, big),
    ]
    assert events[3].stage == "refiner"  # StrEnum: compares as text


def test_the_request_carries_what_was_asked(fake: FakeServer) -> None:
    with Client(fake.target) as client:
        list(
            client.generate(
                "a red bicycle",
                negative_prompt="blur",
                model="civitai:101055@128078",
                width=1024,
                height=768,
                steps=30,
                cfg_scale=6.5,
                seed=2**64 - 1,
                scheduler="dpmpp_2m_karras",
                number_results=2,
                output_format="webp",
                preview_every=5,
                priority=-3,
                request_id="my-request-1",
                refiner=Refiner("civitai:101055@128080", start_percentage=85),
            )
        )
        list(client.generate("no refiner, random seed"))
    asked, plain = (call.request for call in fake.service.calls)
    assert asked == pb.GenerateRequest(
        request_id="my-request-1",
        model="civitai:101055@128078",
        positive_prompt="a red bicycle",
        negative_prompt="blur",
        width=1024,
        height=768,
        steps=30,
        cfg_scale=6.5,
        seed=2**64 - 1,
        scheduler=pb.SCHEDULER_DPMPP_2M_KARRAS,
        number_results=2,
        output_format=pb.OUTPUT_FORMAT_WEBP,
        refiner=pb.Refiner(model="civitai:101055@128080", start_step_percentage=85),
        preview_every=5,
        priority=-3,
    )
    assert not plain.HasField("seed") and not plain.HasField("refiner")


@pytest.mark.parametrize(
    ("model", "refiner", "header"),
    [
        ("", None, "+"),
        ("", Refiner(), "+"),
        ("builtin:tiny-sdxl-base@1", Refiner(start_step=19), "builtin:tiny-sdxl-base@1+"),
        ("civitai:101055@128078", Refiner("civitai:101055@128080"), "civitai:101055@128078+civitai:101055@128080"),
        ("/models/my sdxl/é.safetensors", Refiner("hf:o/r"), "/models/my%20sdxl/%C3%A9.safetensors+hf:o/r"),
        ("urn:air:sdxl:checkpoint:civitai:1@2+3", None, "urn:air:sdxl:checkpoint:civitai:1@2+3+"),
    ],
)
def test_the_pair_affinity_header_names_the_requested_pair(
    fake: FakeServer, model: str, refiner: Refiner | None, header: str
) -> None:
    with Client(fake.target) as client:
        list(client.generate("x", model=model, refiner=refiner))
    assert fake.service.calls[0].metadata["refinery-pair"] == header


def test_a_token_is_sent_as_a_bearer_header(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with Client(fake.target) as client:
        list(client.generate("no token"))
    with Client(fake.target, token="s3cret") as client:
        list(client.generate("a token"))
    monkeypatch.setenv("REFINERY_SERVER", fake.target)
    monkeypatch.setenv("REFINERY_TOKEN", "from-env")
    with Client.from_env() as client:
        list(client.generate("a token from the environment"))
    assert [call.metadata.get("authorization") for call in fake.service.calls] == [
        None,
        "Bearer s3cret",
        "Bearer from-env",
    ]


def test_a_bad_request_names_its_fields(fake: FakeServer) -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="refiner.start_step", description="must be in 2..20"),
            error_details_pb2.BadRequest.FieldViolation(field="positive_prompt", description="must not be blank"),
        ]
    )
    fake.service.failure = failure(grpc.StatusCode.INVALID_ARGUMENT, "refiner.start_step: must be in 2..20", bad)
    with Client(fake.target) as client, pytest.raises(RefineryError) as caught:
        list(client.generate(" ", request_id="mine"))
    error = caught.value
    assert (error.code, error.message, error.request_id) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "refiner.start_step: must be in 2..20",
        "mine",
    )
    assert error.field_violations == (
        FieldViolation("refiner.start_step", "must be in 2..20"),
        FieldViolation("positive_prompt", "must not be blank"),
    )
    assert error.retry_delay is None
    assert str(error) == "INVALID_ARGUMENT: refiner.start_step: must be in 2..20"


def test_overload_says_when_to_retry(fake: FakeServer) -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    fake.service.script = [response(queued=pb.Queued(position=3, queue_depth=4))]
    fake.service.failure = failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (64 waiting)", retry)
    events = []
    with Client(fake.target) as client, pytest.raises(RefineryError) as caught:
        events.extend(client.generate("x"))
    assert events == [Queued(RID, 3, 4)]
    assert (caught.value.code, caught.value.retry_delay) == (grpc.StatusCode.RESOURCE_EXHAUSTED, timedelta(seconds=2.5))
    assert caught.value.request_id == RID  # the id the server assigned, seen on the stream
    assert caught.value.field_violations == ()


def test_a_message_over_the_receive_limit_is_refused_clearly(fake: FakeServer) -> None:
    fake.service.script = [response(image=pb.Image(data=os.urandom(2 * MiB)))]
    with Client(fake.target, max_receive_bytes=MiB) as client, pytest.raises(RefineryError) as caught:
        list(client.generate("x"))
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than this client's receive limit of 1048576 bytes" in caught.value.message


def test_the_default_limit_takes_a_whole_2048_image_from_a_server_that_does_not_chunk(fake: FakeServer) -> None:
    noise = os.urandom(13 * MiB)  # more than a 2048x2048 RGB PNG of noise can take
    fake.service.script = [response(image=pb.Image(data=noise))]
    with Client(fake.target) as client:
        (image,) = client.generate("x")
    assert isinstance(image, Image) and image.data == noise


def test_a_chunk_stream_that_breaks_off_is_an_error_not_an_image(fake: FakeServer) -> None:
    data = os.urandom(5 * MiB)
    fake.service.script = [
        response(image_chunk=pb.ImageChunk(index=0, offset=0, total_size=len(data), data=data[: 3 * MiB])),
    ]
    events = []
    with Client(fake.target) as client, pytest.raises(RefineryError) as caught:
        events.extend(client.generate("x"))
    assert events == []
    assert caught.value.code is grpc.StatusCode.DATA_LOSS
    assert "the stream ended before its last chunk" in caught.value.message


def test_a_server_error_inside_a_chunk_run_keeps_the_servers_status(fake: FakeServer) -> None:
    data = os.urandom(5 * MiB)
    fake.service.script = [
        response(image_chunk=pb.ImageChunk(index=0, offset=0, total_size=len(data), data=data[: 3 * MiB])),
    ]
    fake.service.failure = failure(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
    with Client(fake.target) as client, pytest.raises(RefineryError) as caught:
        list(client.generate("x"))
    assert (caught.value.code, caught.value.message) == (grpc.StatusCode.UNAVAILABLE, "the server is shutting down")


def test_stopping_early_cancels_the_request_on_the_server(fake: FakeServer) -> None:
    fake.service.script = [response(queued=pb.Queued(position=0, queue_depth=1))]
    fake.service.hold = True
    with Client(fake.target) as client:
        events = client.generate("x")
        assert next(events) == Queued(RID, 0, 1)
        events.close()  # what a `break` out of the loop does
        assert fake.service.calls[0].cancelled.wait(30)


def test_mutual_tls(mtls_fake: FakeServer, certificates: Any) -> None:
    mtls_fake.service.script = [response(image=image_meta(0))]
    tls = TLS.from_files(ca=certificates.ca, cert=certificates.client_cert, key=certificates.client_key)
    with Client(mtls_fake.target, tls=tls) as client:
        assert [type(event) for event in client.generate("x")] == [Image]
    # Without a client certificate the server refuses the handshake.
    with Client(mtls_fake.target, tls=TLS.from_files(ca=certificates.ca)) as client, pytest.raises(RefineryError) as e:
        list(client.generate("x", timeout=30))
    assert e.value.code is grpc.StatusCode.UNAVAILABLE
    assert len(mtls_fake.service.calls) == 1


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="needs its private key"):
        TLS(certificate_chain=b"-----BEGIN CERTIFICATE-----")
