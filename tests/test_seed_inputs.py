"""A request's input images found in a real image store (issue 18): an inline image is stored, a reference is
found, and what needs the image's size is refused naming its field, before any work."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from refinery.v1 import generation_pb2 as pb
from server.api.boundary import rpc_error_for
from server.api.seed_inputs import images_of, resolve
from server.api.validation import job_from_request
from server.core import domain
from server.core.errors import BadImage, ImageNotFound, ImageStoreFull, InvalidRequest
from server.core.settings import DEFAULT_PAIR, Limits
from server.images import ImageLimits, ImageStore, StoreLimits

LIMITS = Limits()
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> ImageStore:
    limits = StoreLimits(ImageLimits(8 * 1024 * 1024, 2048, 2048 * 2048), HOUR, 24 * HOUR, 64 * 1024 * 1024)
    return ImageStore(tmp_path / "images", limits, clock=clock)


def generate(store: ImageStore, limits: Limits = LIMITS, work_limit: float | None = None, **fields: Any) -> domain.Job:
    """What the servicer does: validate, then resolve the images."""
    request = pb.GenerateRequest(**{"positive_prompt": "a cat", "steps": 10, **fields})
    job = job_from_request(
        request,
        limits=limits,
        default_model=DEFAULT_PAIR.base,
        default_refiner=None,
        make_request_id=lambda: "r",
        make_seed=lambda: 1,
    )
    return resolve(request, job, store, limits, work_limit=work_limit)


def refused(store: ImageStore, **fields: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequest) as caught:
        generate(store, **fields)
    return [(v.field, v.description) for v in caught.value.violations]


def test_text_to_image_needs_no_store(store: ImageStore) -> None:
    job = generate(store, width=128, height=64)
    assert (job.seed_image, job.width, job.height, job.mode) == (None, 128, 64, domain.ImageMode.TEXT)
    assert images_of(job) == ()


def test_an_inline_image_is_stored_and_the_job_takes_its_size(store: ImageStore) -> None:
    data = png(96, 64)
    job = generate(store, image=pb.ImageInput(data=data), strength=0.5)
    assert job.seed_image is not None
    image = job.seed_image.image
    assert image.reference == "sha256:" + hashlib.sha256(data).hexdigest()
    assert image.path.read_bytes() == data  # the worker reads it from the store, not from the request
    assert (job.width, job.height, job.mode, job.start_index) == (96, 64, domain.ImageMode.IMG2IMG, 5)
    assert store.find(image.reference) == image  # a later request may name it
    assert images_of(job) == (image,)


def test_a_reference_is_found(store: ImageStore) -> None:
    uploaded = store.put_bytes(png(64, 128), keep_for_s=600)
    job = generate(store, image=pb.ImageInput(reference=uploaded.reference), width=64, height=128)
    assert job.seed_image == domain.SeedImage(uploaded)
    assert (job.width, job.height) == (64, 128)


def test_an_unknown_or_expired_reference_is_not_found_naming_its_field(store: ImageStore, clock: Clock) -> None:
    missing = "sha256:" + "0" * 64
    with pytest.raises(ImageNotFound) as caught:
        generate(store, image=pb.ImageInput(reference=missing))
    error = rpc_error_for(caught.value)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.message.startswith("image.reference: ") and missing in error.message

    image = store.put_bytes(png(64, 64))
    mask = store.put_bytes(png(64, 64, (255, 255, 255)), keep_for_s=60)
    clock.now += 61  # the mask expired, the image did not
    with pytest.raises(ImageNotFound) as caught:
        generate(store, image=pb.ImageInput(reference=image.reference), mask=pb.ImageInput(reference=mask.reference))
    assert caught.value.field == "mask.reference"


def test_inline_bytes_that_are_no_image_are_refused_naming_their_field(store: ImageStore) -> None:
    with pytest.raises(BadImage) as caught:
        generate(store, image=pb.ImageInput(data=b"GIF89a not a png"))
    assert caught.value.field == "image.data"
    assert rpc_error_for(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(BadImage) as caught:
        generate(store, image=pb.ImageInput(data=png(64, 64)), mask=pb.ImageInput(data=png(60, 60)))
    assert caught.value.field == "mask.data"  # 60 is no multiple of 8
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".part")]  # nothing half-written left


def test_an_inline_image_over_the_quota_is_refused_naming_its_field(tmp_path: Path) -> None:
    tiny = ImageStore(tmp_path / "tiny", StoreLimits(ImageLimits(1 << 20, 2048, 1 << 22), HOUR, HOUR, 100))
    with pytest.raises(ImageStoreFull) as caught:
        generate(tiny, image=pb.ImageInput(data=png(64, 64)))
    assert caught.value.field == "image.data"
    assert rpc_error_for(caught.value).code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_mask_of_another_size_is_refused(store: ImageStore) -> None:
    found = refused(store, image=pb.ImageInput(data=png(128, 64)), mask=pb.ImageInput(data=png(64, 64)))
    assert found == [("mask", "is 64x64: a mask must be the image's size, 128x64")]


def test_width_and_height_must_be_the_images_without_mask_margin(store: ImageStore) -> None:
    image = pb.ImageInput(data=png(128, 64))
    assert generate(store, image=image, width=128).width == 128
    found = refused(store, image=image, width=64, height=128)
    assert [field for field, _ in found] == ["width", "height"]
    assert "the image's width, 128 (the image is 128x64" in found[0][1]


def test_mask_margin_generates_the_crop_at_the_size_asked(store: ImageStore) -> None:
    image, mask = pb.ImageInput(data=png(256, 128)), pb.ImageInput(data=png(256, 128, (255, 255, 255)))
    job = generate(store, image=image, mask=mask, mask_margin=32, mask_blur=4, width=64, height=64)
    assert job.seed_image is not None
    assert (job.width, job.height, job.mode) == (64, 64, domain.ImageMode.INPAINT)
    assert (job.seed_image.mask_margin, job.seed_image.mask_blur) == (32, 4)
    assert (job.seed_image.image.width, job.seed_image.image.height) == (256, 128)  # the result keeps it
    native = generate(store, image=image, mask=mask, mask_margin=32)
    assert (native.width, native.height) == (0, 0)  # the model's native size, resolved with the model
    assert images_of(native) == (job.seed_image.image, job.seed_image.mask)  # the same bytes: the same images


def test_an_image_is_generated_at_its_size_only_within_the_servers_sides(store: ImageStore) -> None:
    small = Limits(min_side=128, max_side=256)
    image = pb.ImageInput(data=png(64, 512))
    found = refused(store, limits=small, image=image)
    assert found == [
        ("image", "is 64x512: the result has the image's size, so its sides must be multiples of 8 in 128..256")
    ]
    mask = pb.ImageInput(data=png(64, 512, (255, 255, 255)))
    job = generate(store, limits=small, image=image, mask=mask, mask_margin=16, width=128, height=128)
    assert (job.width, job.height) == (128, 128)  # the crop is generated within them


def test_the_work_limit_counts_the_images_size_and_the_steps_that_run(store: ImageStore) -> None:
    image = pb.ImageInput(data=png(256, 256))
    # 256 x 256 x 5 steps (strength 0.5 of 10) = 0.33 megapixel-steps.
    assert generate(store, work_limit=0.33, image=image, strength=0.5).total_steps == 5
    with pytest.raises(InvalidRequest) as caught:
        generate(store, work_limit=0.32, image=image, strength=0.5)
    assert {v.reason for v in caught.value.violations} == {"TOO_MUCH_WORK"}
