"""The pipelines one request runs on, as the device's residency hands them to the two-stage runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.generation.loras import StageLoras

if TYPE_CHECKING:  # diffusers loads in seconds; the types are only for readers and mypy
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline


@dataclass(frozen=True)
class PipelinePair:
    """Loaded pipelines for one request: a base and, optionally, a refiner (both on the same device)."""

    base: StableDiffusionXLPipeline
    refiner: StableDiffusionXLImg2ImgPipeline | None = None
    # The batch's LoRAs, applied by the runner to each stage before it runs.
    loras: StageLoras = field(default_factory=StageLoras)
