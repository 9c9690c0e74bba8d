"""The validation table: every bad field is refused by name, before any work; good requests get defaults."""

from __future__ import annotations

from typing import Any

import pytest

from modelstore import AIR
from refinery.v1 import generation_pb2 as pb
from server.api.validation import job_from_request
from server.core import domain
from server.core.errors import InvalidRequest
from server.core.settings import DEFAULT_BASE, DEFAULT_PAIR, DEFAULT_REFINER, Limits

LIMITS = Limits()


def validate(default_refiner: AIR | None = DEFAULT_PAIR.refiner, **fields: Any) -> domain.Job:
    request = pb.GenerateRequest(**{"positive_prompt": "a cat", **fields})
    return job_from_request(
        request,
        limits=LIMITS,
        default_model=DEFAULT_PAIR.base,
        default_refiner=default_refiner,
        make_request_id=lambda: "assigned-id",
        make_seed=lambda: 1234,
    )


def violations(**fields: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRequest) as caught:
        validate(**fields)
    return [(v.field, v.reason) for v in caught.value.violations]


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"positive_prompt": ""}, "positive_prompt", "REQUIRED"),
        ({"positive_prompt": " \t\n"}, "positive_prompt", "REQUIRED"),
        ({"positive_prompt": "x" * 4001}, "positive_prompt", "INVALID_VALUE"),
        ({"negative_prompt": "x" * 4001}, "negative_prompt", "INVALID_VALUE"),
        ({"request_id": "x" * 129}, "request_id", "INVALID_VALUE"),
        ({"request_id": "line\nbreak"}, "request_id", "INVALID_VALUE"),
        ({"model": "civitai:abc@1"}, "model", "MALFORMED_AIR"),
        ({"model": "ftp:something"}, "model", "MALFORMED_AIR"),
        ({"model": "civitai:101055"}, "model", "MALFORMED_AIR"),  # no version
        ({"model": "local:relative/path"}, "model", "MALFORMED_AIR"),
        ({"model": "civitai:101055@128078.ckpt"}, "model", "MALFORMED_AIR"),  # pickles are refused
        ({"model": "urn:air:sdxl:lora:civitai:1@2"}, "model", "MALFORMED_AIR"),  # not a checkpoint
        ({"width": 100}, "width", "INVALID_VALUE"),
        ({"width": 56}, "width", "INVALID_VALUE"),
        ({"width": 2056}, "width", "INVALID_VALUE"),
        ({"height": 1}, "height", "INVALID_VALUE"),
        ({"steps": 151}, "steps", "INVALID_VALUE"),
        ({"cfg_scale": -1.0}, "cfg_scale", "INVALID_VALUE"),
        ({"cfg_scale": 30.5}, "cfg_scale", "INVALID_VALUE"),
        ({"cfg_scale": float("nan")}, "cfg_scale", "INVALID_VALUE"),
        ({"cfg_scale": float("inf")}, "cfg_scale", "INVALID_VALUE"),
        ({"number_results": 9}, "number_results", "INVALID_VALUE"),
        ({"seed": 2**64 - 1, "number_results": 2}, "seed", "INVALID_VALUE"),
        ({"scheduler": 99}, "scheduler", "INVALID_VALUE"),  # an enum value this server does not know
        ({"output_format": 42}, "output_format", "INVALID_VALUE"),
        ({"preview_every": 151}, "preview_every", "INVALID_VALUE"),
        ({"steps": 20, "refiner": pb.Refiner(start_step=1)}, "refiner.start_step", "INVALID_VALUE"),
        ({"steps": 20, "refiner": pb.Refiner(start_step=21)}, "refiner.start_step", "INVALID_VALUE"),
        (
            {"refiner": pb.Refiner(start_step_percentage=100)},
            "refiner.start_step_percentage",
            "INVALID_VALUE",
        ),
        ({"refiner": pb.Refiner(model="civitai:x@y")}, "refiner.model", "MALFORMED_AIR"),
        ({"steps": 1, "refiner": pb.Refiner()}, "steps", "INVALID_VALUE"),
    ],
)
def test_each_bad_field_is_named(fields: dict[str, Any], field: str, reason: str) -> None:
    assert violations(**fields) == [(field, reason)]


def test_start_step_percentage_zero_is_refused() -> None:
    # 0 is proto3's "unset" for a plain field, but inside the oneof it is an explicit, invalid choice.
    refiner = pb.Refiner()
    refiner.start_step_percentage = 0
    assert violations(refiner=refiner) == [("refiner.start_step_percentage", "INVALID_VALUE")]


def test_refiner_needs_a_model_when_the_server_has_no_default() -> None:
    assert violations(default_refiner=None, refiner=pb.Refiner()) == [("refiner.model", "REQUIRED")]


def test_every_bad_field_is_reported_at_once() -> None:
    fields = violations(positive_prompt="", steps=500, width=7, refiner=pb.Refiner(start_step=1))
    assert [f for f, _ in fields] == ["positive_prompt", "width", "steps", "refiner.start_step"]


def test_defaults() -> None:
    job = validate()
    assert job.request_id == "assigned-id"
    assert job.model == DEFAULT_BASE
    assert job.refiner is None
    assert (job.steps, job.base_steps, job.refiner_steps) == (30, 30, 0)
    assert job.cfg_scale == 7.0
    assert (job.width, job.height) == (0, 0)  # the model's native size, resolved when it is loaded
    assert job.seed == 1234
    assert job.number_results == 1
    assert job.sampler is domain.Sampler.EULER
    assert job.output_format is domain.ImageFormat.PNG
    assert job.negative_prompt is None
    assert job.preview_every == 0


def test_default_refiner_at_ninety_percent() -> None:
    job = validate(steps=20, refiner=pb.Refiner())
    assert job.refiner == domain.RefinerSpec(DEFAULT_REFINER, domain.StartPercentage(90))
    assert (job.base_steps, job.refiner_steps) == (18, 2)


def test_explicit_values_are_kept() -> None:
    job = validate(
        request_id="mine",
        model="urn:air:sdxl:checkpoint:civitai:101055@128078",
        negative_prompt="blurry",
        width=1024,
        height=768,
        steps=30,
        cfg_scale=5.5,
        seed=0,
        number_results=8,
        scheduler=pb.SCHEDULER_DPMPP_2M_KARRAS,
        output_format=pb.OUTPUT_FORMAT_WEBP,
        preview_every=5,
        refiner=pb.Refiner(model="hf:stabilityai/stable-diffusion-xl-refiner-1.0", start_step_percentage=85),
    )
    assert job.request_id == "mine"
    assert job.model == "civitai:101055@128078"  # canonical form
    assert job.refiner is not None and job.refiner.model == "huggingface:stabilityai/stable-diffusion-xl-refiner-1.0"
    assert (job.base_steps, job.refiner_steps) == (26, 4)  # 85 % of 30
    assert (job.width, job.height, job.cfg_scale, job.seed) == (1024, 768, 5.5, 0)
    assert [s.seed for s in job.samples()] == list(range(8))
    assert job.sampler is domain.Sampler.DPMPP_2M_KARRAS
    assert job.output_format is domain.ImageFormat.WEBP
    assert job.negative_prompt == "blurry"
