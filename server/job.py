"""The domain of a generation: what a client asked for and what happens to it.

Protobuf types stop at `server/convert.py`; everything past it (scheduler, workers, the two-stage runner)
speaks these frozen values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class SchedulerKind(Enum):
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    DDIM = "ddim"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    UNIPC = "unipc"


class ImageFormat(Enum):
    PNG = "image/png"
    JPEG = "image/jpeg"
    WEBP = "image/webp"

    @property
    def mime_type(self) -> str:
        return self.value


class Stage(Enum):
    BASE = "base"
    REFINER = "refiner"


class ModelRole(Enum):
    BASE = "base"
    REFINER = "refiner"

    @property
    def field(self) -> str:
        """The request field that names a model of this role."""
        return "model" if self is ModelRole.BASE else "refiner.model"


@dataclass(frozen=True)
class StartStep:
    """The refiner runs steps `step..steps` (1-based); the base runs `1..step-1`."""

    step: int


@dataclass(frozen=True)
class StartPercentage:
    """The base runs `clamp(floor(steps * percent / 100 + 0.5), 1, steps - 1)` steps."""

    percent: int


RefinerStart = StartStep | StartPercentage

DEFAULT_REFINER_START = StartPercentage(90)


@dataclass(frozen=True)
class RefinerSpec:
    model: str  # canonical AIR
    start: RefinerStart = DEFAULT_REFINER_START


@dataclass(frozen=True)
class Sample:
    """One image of a batch: everything that may differ between images that denoise together."""

    prompt: str
    negative_prompt: str | None  # None: the model's default (SDXL base zeroes the negative conditioning)
    seed: int


@dataclass(frozen=True)
class RenderShape:
    """Everything images must share to be denoised as one batch."""

    width: int
    height: int
    steps: int
    base_steps: int  # == steps without a refiner
    cfg_scale: float
    scheduler: SchedulerKind

    @property
    def refiner_steps(self) -> int:
        return self.steps - self.base_steps


@dataclass(frozen=True)
class GenerationJob:
    """A validated request. `width`/`height` of 0 mean the base model's native size, resolved on load."""

    request_id: str
    model: str  # canonical AIR of the base
    refiner: RefinerSpec | None
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    base_steps: int
    cfg_scale: float
    seed: int
    scheduler: SchedulerKind
    number_results: int
    output_format: ImageFormat
    preview_every: int
    priority: int = 0

    @property
    def refiner_steps(self) -> int:
        return self.steps - self.base_steps

    def samples(self) -> list[Sample]:
        """Result i uses seed + i, so any one result can be reproduced alone."""
        return [Sample(self.prompt, self.negative_prompt, self.seed + i) for i in range(self.number_results)]

    def shape(self, width: int, height: int) -> RenderShape:
        return RenderShape(width, height, self.steps, self.base_steps, self.cfg_scale, self.scheduler)


# ---- events: what a running job reports, in order -------------------------------------------------------


@dataclass(frozen=True)
class Queued:
    position: int  # 0 = runs next
    queue_depth: int


class LoadPhase(Enum):
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    LOADING = "loading"
    READY = "ready"


@dataclass(frozen=True)
class ModelLoading:
    model: str
    role: ModelRole
    phase: LoadPhase
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_per_second: float = 0.0


@dataclass(frozen=True)
class Progress:
    stage: Stage
    step: int  # 1-based within the stage
    stage_steps: int
    overall_step: int
    total_steps: int
    elapsed_s: float
    image_indices: tuple[int, ...] = field(default=())


@dataclass(frozen=True)
class Preview:
    stage: Stage
    step: int
    overall_step: int
    image_index: int
    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageResult:
    data: bytes
    mime_type: str
    seed: int
    index: int
    width: int
    height: int
    base_steps: int
    refiner_steps: int
    model: str
    refiner_model: str


JobEvent = Queued | ModelLoading | Progress | Preview | ImageResult
