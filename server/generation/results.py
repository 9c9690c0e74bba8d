"""What a run returns: the images, the stage timings, compare's base-only images and the tokens each encoder read;
and the runner's signature, which tests substitute."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from server.core.domain import RenderShape, Sample, TokenCount
from server.generation.pipelines import PipelinePair
from server.generation.steps import StepObserver


@dataclass
class StageTimings:
    base_s: float = 0.0  # with compare, the base-only branch's steps included
    refiner_s: float = 0.0
    decode_s: float = 0.0  # with compare, both decodes


@dataclass
class RunResult:
    images: list[Image.Image]  # one per sample: refined when there is a refiner
    timings: StageTimings = field(default_factory=StageTimings)
    base_only: list[Image.Image] = field(default_factory=list)  # compare: the base's own image per sample
    tokens: list[tuple[TokenCount, ...]] = field(default_factory=list)  # per sample: what each encoder read


class PipelineRunner(Protocol):
    """`run`'s signature; tests substitute runners that fail or wait on purpose."""

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult: ...
