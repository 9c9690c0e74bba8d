"""The image fields of a request (issue 18) at the edge: every bad one refused by name, all at once, before the
image is even looked up; strength counted on the steps-long grid; refine-only allowed only with an image."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from refinery.v1 import generation_pb2 as pb
from server.api.image_fields import ImageFieldLimits
from server.api.validation import job_from_request
from server.core import domain
from server.core.errors import FieldViolation, InvalidRequest
from server.core.settings import DEFAULT_PAIR, ImageSettings, Limits

REFERENCE = "sha256:" + "0123456789abcdef" * 4
IMAGE = pb.ImageInput(reference=REFERENCE)
MASK = pb.ImageInput(reference="sha256:" + "f" * 64)


def validate(image_limits: ImageFieldLimits | None = None, **fields: Any) -> domain.Job:
    request = pb.GenerateRequest(**{"positive_prompt": "a cat", **fields})
    return job_from_request(
        request,
        limits=Limits(),
        default_model=DEFAULT_PAIR.base,
        default_refiner=DEFAULT_PAIR.refiner,
        image_limits=image_limits or ImageFieldLimits(),
        make_request_id=lambda: "assigned-id",
        make_seed=lambda: 1234,
    )


def refusals(image_limits: ImageFieldLimits | None = None, **fields: Any) -> list[FieldViolation]:
    with pytest.raises(InvalidRequest) as caught:
        validate(image_limits, **fields)
    return list(caught.value.violations)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"strength": 0.5}, "strength", "INVALID_VALUE"),  # no image
        ({"image": IMAGE, "strength": 0.0}, "strength", "INVALID_VALUE"),
        ({"image": IMAGE, "strength": -0.1}, "strength", "INVALID_VALUE"),
        ({"image": IMAGE, "strength": 1.01}, "strength", "INVALID_VALUE"),
        ({"image": IMAGE, "strength": float("nan")}, "strength", "INVALID_VALUE"),
        ({"image": IMAGE, "strength": float("inf")}, "strength", "INVALID_VALUE"),
        ({"image": IMAGE, "strength": 0.03, "steps": 30}, "strength", "INVALID_VALUE"),  # floor(0.9): no step
        ({"image": IMAGE, "strength": 0.5, "steps": 1}, "strength", "INVALID_VALUE"),
        ({"image": pb.ImageInput()}, "image", "REQUIRED"),
        ({"image": pb.ImageInput(data=b"")}, "image.data", "REQUIRED"),
        ({"image": pb.ImageInput(data=b"x" * (96 * 1024 + 1))}, "image.data", "INVALID_VALUE"),
        ({"image": pb.ImageInput(reference="")}, "image.reference", "MALFORMED"),
        ({"image": pb.ImageInput(reference="sha256:" + "A" * 64)}, "image.reference", "MALFORMED"),  # upper case
        ({"image": pb.ImageInput(reference="sha256:" + "a" * 63)}, "image.reference", "MALFORMED"),
        ({"image": pb.ImageInput(reference="md5:" + "a" * 64)}, "image.reference", "MALFORMED"),
        ({"image": pb.ImageInput(reference="../../etc/passwd")}, "image.reference", "MALFORMED"),
        ({"mask": MASK}, "mask", "INVALID_VALUE"),  # no image
        ({"image": IMAGE, "mask": pb.ImageInput()}, "mask", "REQUIRED"),
        ({"image": IMAGE, "mask": pb.ImageInput(reference="sha256:x")}, "mask.reference", "MALFORMED"),
        ({"image": IMAGE, "mask": pb.ImageInput(data=b"x" * (96 * 1024 + 1))}, "mask.data", "INVALID_VALUE"),
        ({"image": IMAGE, "mask": MASK, "mask_blur": 65}, "mask_blur", "INVALID_VALUE"),
        ({"image": IMAGE, "mask_blur": 4}, "mask_blur", "INVALID_VALUE"),  # no mask
        ({"image": IMAGE, "mask": MASK, "mask_margin": 513}, "mask_margin", "INVALID_VALUE"),
        ({"image": IMAGE, "mask_margin": 32}, "mask_margin", "INVALID_VALUE"),  # no mask
        ({"keep_results": Duration(seconds=-1)}, "keep_results", "INVALID_VALUE"),
        ({"keep_results": Duration(seconds=24 * 3600 + 1)}, "keep_results", "INVALID_VALUE"),
        ({"keep_results": Duration(seconds=1, nanos=-5)}, "keep_results", "INVALID_VALUE"),  # mixed signs
        ({"keep_results": Duration(nanos=2_000_000_000)}, "keep_results", "INVALID_VALUE"),
        ({"steps": 20, "refiner": pb.Refiner(start_step=1)}, "refiner.start_step", "INVALID_VALUE"),  # no image
        ({"image": IMAGE, "steps": 20, "refiner": pb.Refiner(start_step=0)}, "refiner.start_step", "INVALID_VALUE"),
        ({"image": IMAGE, "steps": 20, "refiner": pb.Refiner(start_step=21)}, "refiner.start_step", "INVALID_VALUE"),
    ],
)
def test_each_bad_image_field_is_named(fields: dict[str, Any], field: str, reason: str) -> None:
    assert [(v.field, v.reason) for v in refusals(**fields)] == [(field, reason)]


def test_every_bad_image_field_is_named_at_once() -> None:
    found = refusals(
        strength=2.0,
        mask=pb.ImageInput(),
        mask_blur=100,
        mask_margin=600,
        keep_results=Duration(seconds=-5),
        steps=20,
        refiner=pb.Refiner(start_step=1),
    )
    assert [v.field for v in found] == [
        "strength",
        "mask",
        "mask",
        "mask_blur",
        "mask_margin",
        "keep_results",
        "refiner.start_step",
    ]


def test_the_refusals_say_what_would_be_accepted() -> None:
    big = pb.ImageInput(data=b"x" * 200_000)
    (inline,) = refusals(image=big)
    assert "96 KiB" in inline.description and "UploadImage" in inline.description
    (lonely,) = refusals(strength=0.5)
    assert "needs image" in lonely.description
    (too_weak,) = refusals(image=IMAGE, strength=0.03, steps=30)
    assert "30 x 0.03" in too_weak.description
    (start,) = refusals(steps=20, refiner=pb.Refiner(start_step=1))
    assert "2..20" in start.description
    (start_with_image,) = refusals(image=IMAGE, steps=20, refiner=pb.Refiner(start_step=21))
    assert "1..20" in start_with_image.description


def test_the_servers_limits_are_its_own() -> None:
    strict = ImageFieldLimits(max_keep_s=60, inline_bytes=1000)
    assert validate(strict, keep_results=Duration(seconds=60)).keep_results_s == 60
    assert [v.field for v in refusals(strict, keep_results=Duration(seconds=61))] == ["keep_results"]
    assert [v.field for v in refusals(strict, image=pb.ImageInput(data=b"x" * 1001))] == ["image.data"]
    assert [v.field for v in refusals(ImageFieldLimits(max_keep_s=0), keep_results=Duration(seconds=1))] == [
        "keep_results"
    ]


def test_the_limits_are_the_servers_image_settings() -> None:
    settings = ImageSettings(max_keep_s=120, inline_bytes=2048)
    assert ImageFieldLimits.of(settings) == ImageFieldLimits(max_keep_s=120, inline_bytes=2048)
    assert ImageFieldLimits() == ImageFieldLimits.of(ImageSettings())  # the defaults agree


def test_text_to_image_is_unchanged() -> None:
    job = validate(steps=30)
    assert (job.mode, job.start_index, job.keep_results_s, job.seed_image) == (domain.ImageMode.TEXT, 0, 0.0, None)
    assert job.total_steps == 30


def test_defaults_with_an_image() -> None:
    job = validate(image=IMAGE, steps=30)
    assert job.start_index == 30 - 24  # strength 0.8: the last floor(30 x 0.8) = 24 steps run
    assert job.total_steps == 24
    assert job.seed_image is None  # the image is resolved against the store next (seed_inputs.resolve)


def test_kept_results() -> None:
    assert validate(keep_results=Duration(seconds=3600)).keep_results_s == 3600
    assert validate(keep_results=Duration(seconds=1, nanos=500_000_000)).keep_results_s == 1.5
    assert validate(keep_results=Duration()).keep_results_s == 0


@pytest.mark.parametrize(
    ("steps", "strength", "start_index"),
    [(30, 0.7, 9), (30, 0.5, 15), (30, 1.0, 0), (30, 0.04, 29), (25, 0.3, 18), (1, 1.0, 0), (10, 0.99, 1)],
)
def test_strength_runs_the_last_steps_of_the_grid(steps: int, strength: float, start_index: int) -> None:
    """floor(steps x strength) steps run, strength read to 4 decimals: float32's 0.7 is 0.69999999, and still
    runs 21 of 30."""
    job = validate(image=IMAGE, steps=steps, strength=strength)
    assert job.start_index == start_index
    assert job.total_steps == steps - start_index


def test_strength_and_the_refiners_start_share_one_grid() -> None:
    """The issue's example: strength 0.5 and the refiner at 90 % of 30 steps: the base runs 16..27, the refiner
    28..30."""
    job = validate(image=IMAGE, steps=30, strength=0.5, refiner=pb.Refiner(start_step_percentage=90))
    assert (job.start_index, job.base_steps, job.base_steps_run, job.refiner_steps) == (15, 27, 12, 3)


def test_start_step_1_with_an_image_is_refine_only() -> None:
    job = validate(image=IMAGE, steps=20, strength=0.5, refiner=pb.Refiner(start_step=1))
    assert (job.base_steps, job.base_steps_run, job.refiner_steps) == (0, 0, 10)


def test_a_refiner_start_before_the_first_step_that_runs_is_refine_only() -> None:
    job = validate(image=IMAGE, steps=30, strength=0.3, refiner=pb.Refiner(start_step=10))
    assert (job.start_index, job.base_steps_run, job.refiner_steps) == (21, 0, 9)


def test_an_inpainting_request_passes_the_edge() -> None:
    inline = pb.ImageInput(data=b"\x89PNG" + b"\0" * 100)  # decoded later, by the image store
    job = validate(image=inline, mask=MASK, mask_blur=64, mask_margin=512, strength=1.0)
    assert job.start_index == 0
