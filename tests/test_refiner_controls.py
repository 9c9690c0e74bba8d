"""The refiner's controls and compare as validation turns them into a job, and how they decide batching."""

from __future__ import annotations

import pytest

from refinery.v1 import generation_pb2 as pb
from server.core import domain
from server.scheduling.scheduler import batch_key
from tests.test_validation import validate, violations


def test_unset_controls_are_diffusers_defaults_and_the_requests_prompts() -> None:
    job = validate(negative_prompt="blurry", steps=30, refiner=pb.Refiner(start_step_percentage=90))
    assert job.refiner is not None
    assert job.refiner.scores == domain.AestheticScores(6.0, 2.5)
    assert job.refiner.prompt is None and not job.compare
    (sample,) = job.samples()
    assert sample.conditioning(domain.Stage.REFINER) == domain.Prompt("a cat", "blurry")
    assert job.total_steps == 30


def test_explicit_controls_are_kept() -> None:
    refiner = pb.Refiner(
        compare=True,
        aesthetic_score=0.0,  # explicit zero: `optional` tells it from unset
        negative_aesthetic_score=10.0,
        positive_prompt="a watercolour",
        negative_prompt="a photo",
    )
    job = validate(negative_prompt="blurry", steps=30, number_results=2, refiner=refiner)
    assert job.refiner is not None and job.compare
    assert job.refiner.scores == domain.AestheticScores(0.0, 10.0)
    assert [s.conditioning(domain.Stage.BASE) for s in job.samples()] == [domain.Prompt("a cat", "blurry")] * 2
    assert [s.conditioning(domain.Stage.REFINER) for s in job.samples()] == [
        domain.Prompt("a watercolour", "a photo")
    ] * 2
    assert (job.base_steps, job.refiner_steps, job.total_steps) == (27, 3, 33)  # 27 shared + 3 refiner + 3 alone


@pytest.mark.parametrize(
    ("refiner", "expected"),
    [
        (pb.Refiner(negative_prompt=""), domain.Prompt("a cat", None)),  # set but empty: no negative for it
        (pb.Refiner(negative_prompt="grain"), domain.Prompt("a cat", "grain")),
        (pb.Refiner(positive_prompt="a dog"), domain.Prompt("a dog", "blurry")),  # the request's negative
    ],
)
def test_each_refiner_prompt_falls_back_to_the_requests_own(refiner: pb.Refiner, expected: domain.Prompt) -> None:
    (sample,) = validate(negative_prompt="blurry", refiner=refiner).samples()
    assert sample.conditioning(domain.Stage.REFINER) == expected
    assert sample.conditioning(domain.Stage.BASE) == domain.Prompt("a cat", "blurry")


@pytest.mark.parametrize(
    ("refiner", "field", "reason"),
    [
        (pb.Refiner(aesthetic_score=float("nan")), "refiner.aesthetic_score", "INVALID_VALUE"),
        (pb.Refiner(aesthetic_score=-0.1), "refiner.aesthetic_score", "INVALID_VALUE"),
        (pb.Refiner(negative_aesthetic_score=float("inf")), "refiner.negative_aesthetic_score", "INVALID_VALUE"),
        (pb.Refiner(negative_aesthetic_score=10.01), "refiner.negative_aesthetic_score", "INVALID_VALUE"),
        (pb.Refiner(positive_prompt=""), "refiner.positive_prompt", "REQUIRED"),
        (pb.Refiner(positive_prompt="x" * 4001), "refiner.positive_prompt", "INVALID_VALUE"),
        (pb.Refiner(negative_prompt="x" * 4001), "refiner.negative_prompt", "INVALID_VALUE"),
    ],
)
def test_each_bad_control_is_named(refiner: pb.Refiner, field: str, reason: str) -> None:
    assert violations(refiner=refiner) == [(field, reason)]


def test_compare_needs_a_refiner() -> None:
    assert violations(default_refiner=None, refiner=pb.Refiner(compare=True)) == [
        ("refiner.model", "REQUIRED"),
        ("refiner.compare", "INVALID_VALUE"),
    ]


def test_bad_controls_are_reported_with_every_other_bad_field() -> None:
    refiner = pb.Refiner(model="hf:", aesthetic_score=11, positive_prompt=" ")
    fields = [f for f, _ in violations(positive_prompt="", refiner=refiner)]
    assert fields == ["positive_prompt", "refiner.model", "refiner.aesthetic_score", "refiner.positive_prompt"]


def test_batch_keys() -> None:
    def key(**refiner: object) -> object:
        return batch_key(validate(steps=20, refiner=pb.Refiner(start_step=18, **refiner)))

    plain = key()
    assert key(positive_prompt="own", negative_prompt="") == plain  # prompts are per image
    assert key(aesthetic_score=6.0, negative_aesthetic_score=2.5) == plain  # the defaults, spelled out
    assert key(compare=True) != plain
    assert key(aesthetic_score=7.0) != plain
    assert key(negative_aesthetic_score=2.0) != plain
    assert key(compare=True) == key(compare=True)
