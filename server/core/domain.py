"""The words every room of the server speaks: what a client asked for (`Job`), the pair of models it runs on
(`PairKey`), and the events that report what happens to it.

Protobuf types stop at `server/api/`; everything past it (scheduling, the device workers, the two-stage runner)
speaks these frozen values. One request has two names: the `Job` it asked for (a value, fixed once validated)
and the `server.scheduling.ticket.Ticket` that tracks it while it is admitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from modelstore import AIR, Role, parse_air
from server.core.seed_images import DEFAULT_STRENGTH as DEFAULT_STRENGTH
from server.core.seed_images import ImageMode as ImageMode
from server.core.seed_images import SeedImage as SeedImage
from server.core.seed_images import StoredImage as StoredImage


class Sampler(Enum):
    """The denoising algorithm (diffusers calls these schedulers; the device scheduler is something else)."""

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


class Branch(Enum):
    """Which image of a compare request an event belongs to (`RefinerSpec.compare`)."""

    MAIN = "main"  # the request's own output; with compare, also the shared base steps and the refined image
    BASE_ONLY = "base_only"  # compare: the base's steps after the hand-off and the image the base makes alone


@dataclass(frozen=True)
class PairKey:
    """The models a request runs on: a base and, optionally, a refiner, as parsed at the edge (an AIR equals
    another naming the same model, so pairs compare and hash by the models' canonical identity)."""

    base: AIR
    refiner: AIR | None

    def __str__(self) -> str:
        return str(self.base) if self.refiner is None else f"{self.base}+{self.refiner}"

    @classmethod
    def parse(cls, text: str) -> PairKey:
        """ "BASE[+REFINER]" as operators write pairs (`--pin`). A '+' starts the refiner only where what follows
        is an AIR or a path of its own: civitai's "+fileId" and Hugging Face's "+file" belong to the AIR before
        them. Raises ValueError, or `modelstore.errors.InvalidModelId` for a malformed AIR."""
        parts = text.split("+")
        models: list[str] = [parts[0]]
        for part in parts[1:]:
            if ":" in part or part.startswith("/"):
                models.append(part)
            else:
                models[-1] += "+" + part
        if len(models) > 2:
            raise ValueError(f"{text!r}: a pair is BASE or BASE+REFINER")
        return cls(parse_air(models[0]), parse_air(models[1]) if len(models) == 2 else None)

    def roles(self) -> list[tuple[Role, AIR]]:
        """Each model with its role, the base first."""
        return [(Role.BASE, self.base)] + ([] if self.refiner is None else [(Role.REFINER, self.refiner)])


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
class AestheticScores:
    """The SDXL refiner's aesthetic conditioning (diffusers' `aesthetic_score` / `negative_aesthetic_score`)."""

    positive: float = 6.0
    negative: float = 2.5


AESTHETIC_SCORE_RANGE = (0.0, 10.0)  # the LAION aesthetic predictor's scale, which SDXL was conditioned on


class PromptWeighting(Enum):
    """How prompts are read: plain text, compel's syntax, or AUTOMATIC1111's (both weighted by compel)."""

    NONE = "none"
    COMPEL = "compel"
    A1111 = "a1111"


# A prompt is encoded in windows of 75 tokens (77 with the start and end tokens), at most this many.
CHUNK_TOKENS = 75
WINDOW_TOKENS = CHUNK_TOKENS + 2  # a window as the encoders read it, with the start and end tokens
MAX_CHUNKS = 8
MAX_LORAS = 4  # per stage
LORA_WEIGHT_RANGE = (-4.0, 4.0)  # Runware's


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of one stage, as asked for: its model and strength."""

    model: AIR
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.model}:{self.weight:g}"


@dataclass(frozen=True)
class TokenCount:
    """What one text encoder of one stage read of a sample's prompts (start and end tokens not counted)."""

    stage: Stage
    encoder: str  # "text_encoder" (CLIP ViT-L) or "text_encoder_2" (OpenCLIP bigG)
    positive: int
    negative: int
    chunks: int


@dataclass(frozen=True)
class Prompt:
    """What one stage is conditioned on."""

    positive: str
    negative: str | None  # None: the model's default (SDXL base zeroes the negative conditioning)


@dataclass(frozen=True)
class RefinerSpec:
    model: AIR
    start: RefinerStart = DEFAULT_REFINER_START
    # Also return the image the base makes alone (same seed): the base's shared steps run once for both.
    compare: bool = False
    scores: AestheticScores = AestheticScores()
    prompt: Prompt | None = None  # the refiner's own prompts; None: the request's
    loras: tuple[LoraSpec, ...] = ()  # never the base's: a base LoRA does not fit the refiner's UNet
    chunks: int = 1  # 75-token windows the refiner's prompts take (the longer of positive and negative)


@dataclass(frozen=True)
class Sample:
    """One image of a batch: everything that may differ between images that denoise together."""

    prompt: str
    negative_prompt: str | None  # None: the model's default (SDXL base zeroes the negative conditioning)
    seed: int
    refiner_prompt: Prompt | None = None  # None: the refiner gets the base's prompts
    weighting: PromptWeighting = PromptWeighting.NONE
    seed_image: SeedImage | None = None  # None: text-to-image

    def conditioning(self, stage: Stage) -> Prompt:
        if stage is Stage.REFINER and self.refiner_prompt is not None:
            return self.refiner_prompt
        return Prompt(self.prompt, self.negative_prompt)


@dataclass(frozen=True)
class RenderShape:
    """Everything images must share to be denoised as one batch."""

    width: int
    height: int
    steps: int
    base_steps: int  # == steps without a refiner
    cfg_scale: float
    sampler: Sampler
    # Refiner conditioning is one set of time ids per batch, and a compare batch runs the base to the end for
    # every image in it: both must be shared.
    compare: bool = False
    scores: AestheticScores = AestheticScores()
    # A batch has one set of LoRAs per stage applied to its models, and one text sequence length (a UNet call
    # takes one): requests differing in either never share a batch.
    loras: tuple[LoraSpec, ...] = ()
    refiner_loras: tuple[LoraSpec, ...] = ()
    chunks: int = 1
    refiner_chunks: int = 1
    # Starting from an image, denoising begins at this 0-based index of the steps-long grid (img2img's
    # strength) and the first `start_index` steps never run; 0 for text-to-image. `base_steps` stays the
    # hand-off's index on the same grid, so the refiner's start does not depend on strength.
    mode: ImageMode = ImageMode.TEXT
    start_index: int = 0

    @property
    def base_steps_run(self) -> int:
        """Steps the base runs before the hand-off (0: refine-only)."""
        return max(0, self.base_steps - self.start_index)

    @property
    def refiner_steps(self) -> int:
        """Steps the refiner runs (0 without one)."""
        return self.steps - max(self.base_steps, self.start_index)

    @property
    def refine_only(self) -> bool:
        return self.refiner_steps > 0 and self.base_steps_run == 0

    @property
    def steps_run(self) -> int:
        return self.steps - self.start_index

    @property
    def total_steps(self) -> int:
        """Denoising steps run: with compare, the base also runs the refiner's steps for its own image."""
        return self.steps_run + (self.refiner_steps if self.compare else 0)


@dataclass(frozen=True)
class Job:
    """A validated request. `width`/`height` of 0 mean the base model's native size, resolved on load."""

    request_id: str
    model: AIR  # the base
    refiner: RefinerSpec | None
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    base_steps: int
    cfg_scale: float
    seed: int
    sampler: Sampler
    number_results: int
    output_format: ImageFormat
    preview_every: int
    priority: int = 0
    loras: tuple[LoraSpec, ...] = ()  # the base's
    prompt_weighting: PromptWeighting = PromptWeighting.NONE
    chunks: int = 1  # 75-token windows the base's prompts take (the longer of positive and negative)
    seed_image: SeedImage | None = None  # None: text-to-image
    start_index: int = 0  # the grid index denoising starts at: steps - floor(steps x strength) with an image
    keep_results_s: float = 0.0  # > 0: results are stored this long and named by a reference

    @property
    def mode(self) -> ImageMode:
        return ImageMode.TEXT if self.seed_image is None else self.seed_image.mode

    @property
    def base_steps_run(self) -> int:
        return self.shape(self.width, self.height).base_steps_run

    @property
    def refiner_steps(self) -> int:
        return self.shape(self.width, self.height).refiner_steps

    @property
    def compare(self) -> bool:
        return self.refiner is not None and self.refiner.compare

    @property
    def total_steps(self) -> int:
        return self.shape(self.width, self.height).total_steps

    def samples(self) -> list[Sample]:
        """Result i uses seed + i, so any one result can be reproduced alone."""
        refiner_prompt = self.refiner.prompt if self.refiner is not None else None
        return [
            Sample(
                self.prompt, self.negative_prompt, self.seed + i, refiner_prompt, self.prompt_weighting, self.seed_image
            )
            for i in range(self.number_results)
        ]

    def work(self, width: int, height: int) -> float:
        """What the request costs a device, in megapixel-steps: width x height x results x steps."""
        return width * height * self.number_results * self.total_steps / 1e6

    @property
    def pair(self) -> PairKey:
        return PairKey(self.model, self.refiner.model if self.refiner is not None else None)

    def shape(self, width: int, height: int) -> RenderShape:
        refiner = self.refiner
        return RenderShape(
            width,
            height,
            self.steps,
            self.base_steps,
            self.cfg_scale,
            self.sampler,
            self.compare,
            refiner.scores if refiner is not None else AestheticScores(),
            self.loras,
            refiner.loras if refiner is not None else (),
            self.chunks,
            refiner.chunks if refiner is not None else 1,
            self.mode,
            self.start_index,
        )


# ---- events: what a running request reports, in order -------------------------------------------------------


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
    model: AIR
    role: Role
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
    branch: Branch = Branch.MAIN


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
    branch: Branch = Branch.MAIN


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
    branch: Branch = Branch.MAIN
    loras: tuple[LoraSpec, ...] = ()
    refiner_loras: tuple[LoraSpec, ...] = ()
    tokens: tuple[TokenCount, ...] = ()
    mode: ImageMode = ImageMode.TEXT
    first_step: int = 1  # 1-based on the steps-long grid
    reference: str = ""  # with keep_results: "sha256:<hex>" in the image store
    reference_expires: float = 0.0  # unix seconds


JobEvent = Queued | ModelLoading | Progress | Preview | ImageResult
