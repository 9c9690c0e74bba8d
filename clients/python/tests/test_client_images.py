"""Images to start from, against the scripted server: `upload_image` streams a header (size, sha256, time kept)
then the bytes in 64 KiB messages; `generate` sends an image of at most 96 KiB inline, uploads a larger one
first and names it by reference, passes a reference through; results report their mode, first step and
reference."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from scripted_server import FakeServer, failure

from refinery.client import (
    INLINE_LIMIT,
    AsyncClient,
    Client,
    FieldViolation,
    Image,
    ImageMode,
    Refiner,
    RefineryError,
    Resent,
    UploadedImage,
    generate_request,
)
from refinery.v1 import generation_pb2 as pb

KiB = 1024
EXPIRES = datetime.fromtimestamp(1_900_000_000, UTC)  # what the scripted server answers


def reference(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def test_a_file_is_uploaded_in_64_kib_messages_after_a_header_with_its_size_and_sha256(
    fake: FakeServer, tmp_path: Path
) -> None:
    data = os.urandom(300 * KiB + 5)
    path = tmp_path / "in.png"
    path.write_bytes(data)
    with Client(fake.target, token="t0k") as client:
        stored = client.upload_image(path)
    (upload,) = fake.service.uploads
    assert upload.header == pb.UploadHeader(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert not upload.header.HasField("keep_for")  # the server's default
    assert upload.pieces == [64 * KiB] * 4 + [44 * KiB + 5]
    assert upload.data == data
    assert upload.metadata["authorization"] == "Bearer t0k"
    assert stored == UploadedImage(reference(data), "image/png", 0, 0, len(data), EXPIRES)


@pytest.mark.parametrize(
    ("keep_for", "sent"),
    [(timedelta(hours=2), timedelta(hours=2)), (90, timedelta(seconds=90)), (0.5, timedelta(milliseconds=500))],
)
def test_bytes_are_uploaded_with_the_time_to_keep_them(
    fake: FakeServer, keep_for: timedelta | float, sent: timedelta
) -> None:
    data = os.urandom(130 * KiB)
    with Client(fake.target) as client:
        assert client.upload_image(data, keep_for).reference == reference(data)
    (upload,) = fake.service.uploads
    assert upload.header.keep_for.ToTimedelta() == sent
    assert upload.pieces == [64 * KiB, 64 * KiB, 2 * KiB] and upload.data == data


@pytest.mark.parametrize("keep_for", [-1, float("nan"), timedelta(seconds=-5)])
def test_a_bad_time_to_keep_is_refused_before_any_call(fake: FakeServer, keep_for: timedelta | float) -> None:
    with Client(fake.target) as client, pytest.raises(ValueError, match="keep_for: expected a duration"):
        client.upload_image(b"png", keep_for)
    assert fake.service.uploads == []


def test_a_reference_is_not_uploaded_again(fake: FakeServer) -> None:
    with Client(fake.target) as client, pytest.raises(ValueError, match="nothing to upload"):
        client.upload_image(reference(b"x"))
    assert fake.service.uploads == []


def test_an_image_up_to_96_kib_goes_inline_and_a_larger_one_is_uploaded_and_named(
    fake: FakeServer, tmp_path: Path
) -> None:
    small, large = os.urandom(INLINE_LIMIT), os.urandom(INLINE_LIMIT + 1)
    (tmp_path / "large.png").write_bytes(large)
    with Client(fake.target) as client:
        list(client.generate("a", image=small, strength=0.6))
        list(client.generate("b", image=tmp_path / "large.png", model="m", refiner=Refiner("r")))
        list(client.generate("c", image=str(tmp_path / "large.png")))  # a path as text
    inline, uploaded, again = (call.request for call in fake.service.calls)
    assert inline.image == pb.ImageInput(data=small) and inline.strength == pytest.approx(0.6)
    assert uploaded.image == pb.ImageInput(reference=reference(large))
    assert not uploaded.HasField("strength")  # unset: the server's 0.8
    assert again.image == uploaded.image
    assert [upload.data for upload in fake.service.uploads] == [large, large]
    # The upload goes where the request's pair goes, behind a balancer that routes by pair.
    assert fake.service.uploads[0].metadata["refinery-pair"] == fake.service.calls[1].metadata["refinery-pair"]
    assert fake.service.uploads[0].metadata["refinery-pair"] == "m+r"


def test_an_inpainting_request_carries_its_mask_and_settings(fake: FakeServer, tmp_path: Path) -> None:
    image, mask = os.urandom(200 * KiB), b"\x89PNG small mask"
    (tmp_path / "mask.png").write_bytes(mask)
    stored = reference(b"an image uploaded earlier")
    with Client(fake.target) as client:
        list(
            client.generate(
                "a", image=image, mask=tmp_path / "mask.png", mask_blur=8, mask_margin=32, keep_results=3600
            )
        )
        list(client.generate("b", image=stored, mask=stored, keep_results=timedelta(minutes=5)))
    first, second = (call.request for call in fake.service.calls)
    assert first.image == pb.ImageInput(reference=reference(image))
    assert first.mask == pb.ImageInput(data=mask)
    assert (first.mask_blur, first.mask_margin) == (8, 32)
    assert first.keep_results.ToTimedelta() == timedelta(hours=1)
    assert second.image == second.mask == pb.ImageInput(reference=stored)
    assert second.keep_results.ToTimedelta() == timedelta(minutes=5)
    assert [upload.data for upload in fake.service.uploads] == [image]  # the references are sent as they are


def test_a_request_built_by_hand_refuses_an_image_too_large_to_go_inline() -> None:
    with pytest.raises(ValueError, match=r"mask: 98305 bytes is over the 96 KiB a request can carry inline"):
        generate_request("a", image=b"small", mask=os.urandom(INLINE_LIMIT + 1))
    assert generate_request("a", image=b"small").image.data == b"small"


def test_a_refused_upload_names_its_field_and_no_generation_is_sent(fake: FakeServer) -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="data", description="not a PNG, JPEG or WebP image")
        ]
    )
    fake.service.upload_failures = [failure(grpc.StatusCode.INVALID_ARGUMENT, "data: not a PNG, JPEG or WebP", bad)]
    with Client(fake.target) as client, pytest.raises(RefineryError) as caught:
        list(client.generate("a", image=os.urandom(INLINE_LIMIT + 1)))
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field_violations == (FieldViolation("data", "not a PNG, JPEG or WebP image"),)
    assert len(fake.service.uploads) == 1 and fake.service.calls == []


def test_an_upload_a_lost_replica_refused_is_sent_again_whole(fake: FakeServer) -> None:
    data = os.urandom(150 * KiB)
    fake.service.upload_failures = [failure(grpc.StatusCode.UNAVAILABLE, "the server is draining")]
    resent: list[Resent] = []
    with Client(fake.target, on_resend=resent.append) as client:
        assert client.upload_image(data).reference == reference(data)
    first, second = fake.service.uploads
    assert first.data == second.data == data and first.header == second.header
    assert second.metadata["refinery-attempt"] == "2"
    assert [r.code for r in resent] == [grpc.StatusCode.UNAVAILABLE]


def test_an_over_quota_upload_is_not_resent(fake: FakeServer) -> None:
    fake.service.upload_failures = [failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the image store's quota")]
    with Client(fake.target) as client, pytest.raises(RefineryError) as caught:
        client.upload_image(os.urandom(KiB))
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and len(fake.service.uploads) == 1


def test_a_result_says_what_it_started_from_and_where_it_is_kept(fake: FakeServer) -> None:
    meta = pb.Image(
        index=0, data=b"png", mime_type="image/png", width=64, height=64, base_steps=12, refiner_steps=3,
        mode=pb.IMAGE_MODE_INPAINT, first_step=16, reference=reference(b"png"),
    )  # fmt: skip
    meta.reference_expires.FromSeconds(1_900_000_000)
    fake.service.script = [pb.GenerateResponse(request_id="r", image=meta), pb.GenerateResponse(image=pb.Image())]
    with Client(fake.target) as client:
        inpainted, plain = client.generate("a", image=b"png", mask=b"mask")
    assert isinstance(inpainted, Image) and isinstance(plain, Image)
    assert (inpainted.mode, inpainted.first_step, inpainted.base_steps, inpainted.refiner_steps) == (
        ImageMode.INPAINT,
        16,
        12,
        3,
    )
    assert (inpainted.reference, inpainted.reference_expires) == (reference(b"png"), EXPIRES)
    assert (plain.mode, plain.first_step, plain.reference, plain.reference_expires) == (ImageMode.TEXT, 1, "", None)


def test_the_async_client_uploads_the_same_way(fake: FakeServer, tmp_path: Path) -> None:
    large = os.urandom(INLINE_LIMIT + 10)
    (tmp_path / "in.webp").write_bytes(large)

    async def run() -> UploadedImage:
        async with AsyncClient(fake.target, token="t0k") as client:
            stored = await client.upload_image(tmp_path / "in.webp", timedelta(hours=3))
            [event async for event in client.generate("a", image=tmp_path / "in.webp", mask=b"m", strength=0.5)]
            return stored

    stored = asyncio.run(run())
    assert stored.reference == reference(large) and stored.expires == EXPIRES
    kept, plain = fake.service.uploads
    assert kept.header.keep_for.ToTimedelta() == timedelta(hours=3) and not plain.header.HasField("keep_for")
    assert kept.pieces == plain.pieces == [64 * KiB, 32 * KiB + 10]
    assert plain.metadata["authorization"] == "Bearer t0k"
    (call,) = fake.service.calls
    assert call.request.image == pb.ImageInput(reference=reference(large))
    assert call.request.mask == pb.ImageInput(data=b"m") and call.request.strength == 0.5
