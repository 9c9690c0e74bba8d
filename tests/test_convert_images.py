"""What a client reads on an Image about where it started (issue 18): the mode, the first step that ran, and
the reference it is kept under, on whole images and on chunked ones alike."""

from __future__ import annotations

import dataclasses

from refinery.v1 import generation_pb2 as pb
from server.api.convert import generate_response, generate_responses
from server.core import domain

TEXT = domain.ImageResult(
    data=b"png",
    mime_type="image/png",
    seed=7,
    index=0,
    width=64,
    height=64,
    base_steps=27,
    refiner_steps=3,
    model="urn:air:sdxl:checkpoint:builtin:tiny-sdxl-base@1",
    refiner_model="",
)
KEPT = "sha256:" + "ab" * 32


def image_of(event: domain.ImageResult) -> pb.Image:
    return generate_response("r", event).image


def test_text_to_image_reads_as_before() -> None:
    image = image_of(TEXT)
    assert (image.mode, image.first_step, image.reference) == (pb.IMAGE_MODE_UNSPECIFIED, 1, "")
    assert not image.HasField("reference_expires")


def test_an_inpainted_kept_result_says_where_it_started_and_until_when_it_is_kept() -> None:
    event = dataclasses.replace(
        TEXT,
        mode=domain.ImageMode.INPAINT,
        first_step=16,
        base_steps=12,
        reference=KEPT,
        reference_expires=1_700_000_000.25,
    )
    image = image_of(event)
    assert (image.mode, image.first_step, image.base_steps, image.refiner_steps) == (pb.IMAGE_MODE_INPAINT, 16, 12, 3)
    assert image.reference == KEPT
    assert (image.reference_expires.seconds, image.reference_expires.nanos) == (1_700_000_000, 250_000_000)


def test_img2img_is_its_own_mode() -> None:
    assert image_of(dataclasses.replace(TEXT, mode=domain.ImageMode.IMG2IMG)).mode == pb.IMAGE_MODE_IMG2IMG


def test_a_chunked_result_carries_them_on_its_last_chunk() -> None:
    event = dataclasses.replace(
        TEXT, data=b"x" * 10, mode=domain.ImageMode.IMG2IMG, first_step=7, reference=KEPT, reference_expires=5.0
    )
    *_, last = generate_responses("r", event, chunk_bytes=4)
    image = last.image_chunk.image
    assert (image.mode, image.first_step, image.reference) == (pb.IMAGE_MODE_IMG2IMG, 7, KEPT)
    assert image.reference_expires.seconds == 5
