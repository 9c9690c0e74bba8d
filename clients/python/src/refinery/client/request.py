"""Building a GenerateRequest from keyword arguments, for `Client.generate` and `AsyncClient.generate`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Literal, TypedDict, Unpack

from refinery.client.images import ImageSource, duration, image_input, needs_upload
from refinery.v1 import generation_pb2 as pb


class Scheduler(StrEnum):
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    DDIM = "ddim"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    UNIPC = "unipc"


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


class PromptWeighting(StrEnum):
    """How the prompts are read. NONE: plain text, every character part of the prompt (what a request without
    this field gets). COMPEL: the compel library's syntax ("a (red)1.3 cat", "a cat++"). A1111: AUTOMATIC1111's
    ("(red:1.3)", "(red)" = 1.1, "[red]" = 1 / 1.1), weighted with compel's arithmetic."""

    NONE = "none"
    COMPEL = "compel"
    A1111 = "a1111"


_SCHEDULERS = {
    Scheduler.EULER: pb.SCHEDULER_EULER,
    Scheduler.EULER_ANCESTRAL: pb.SCHEDULER_EULER_ANCESTRAL,
    Scheduler.DDIM: pb.SCHEDULER_DDIM,
    Scheduler.DPMPP_2M: pb.SCHEDULER_DPMPP_2M,
    Scheduler.DPMPP_2M_KARRAS: pb.SCHEDULER_DPMPP_2M_KARRAS,
    Scheduler.UNIPC: pb.SCHEDULER_UNIPC,
}
_FORMATS = {
    OutputFormat.PNG: pb.OUTPUT_FORMAT_PNG,
    OutputFormat.JPEG: pb.OUTPUT_FORMAT_JPEG,
    OutputFormat.WEBP: pb.OUTPUT_FORMAT_WEBP,
}
_WEIGHTINGS = {
    PromptWeighting.NONE: pb.PROMPT_WEIGHTING_UNSPECIFIED,
    PromptWeighting.COMPEL: pb.PROMPT_WEIGHTING_COMPEL,
    PromptWeighting.A1111: pb.PROMPT_WEIGHTING_A1111,
}


@dataclass(frozen=True)
class Lora:
    """A LoRA for one stage: its AIR ("civitai:122359@135867", "hf:owner/repo@rev+file.safetensors", a local
    .safetensors under the server's allowed roots, "builtin:tiny-lora-base@1") and its strength. `weight`
    None: the server's default, 1. The server checks both (at most 4 per stage, each once, weight in -4..4)."""

    model: str
    weight: float | None = None

    def to_proto(self) -> pb.Lora:
        lora = pb.Lora(model=self.model)
        if self.weight is not None:  # an explicit 0 is sent: it applies nothing, unlike unset (1)
            lora.weight = self.weight
        return lora


def _loras(loras: Iterable[Lora]) -> list[pb.Lora]:
    return [lora.to_proto() for lora in loras]


@dataclass(frozen=True)
class Refiner:
    """Hand the last steps to an SDXL refiner. `model` empty: the server's default refiner. Where it takes
    over: `start_step` (it runs start_step..steps), or `start_percentage` of the steps for the base, or 90 %.
    `compare`: also return, per result, the image the base alone makes from the same seed (events carry
    `branch`). The refiner's own conditioning: `aesthetic_score` (server default 6.0),
    `negative_aesthetic_score` (2.5), and its own `prompt` / `negative_prompt` (default: the request's).
    `loras`: LoRAs for the refiner's UNet; the request's own `loras` never reach the refiner."""

    model: str = ""
    start_step: int | None = None
    start_percentage: int | None = None
    compare: bool = False
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    loras: Sequence[Lora] = ()

    def __post_init__(self) -> None:
        if self.start_step is not None and self.start_percentage is not None:
            raise ValueError("give start_step or start_percentage, not both")
        object.__setattr__(self, "loras", tuple(self.loras))  # a list given stays the caller's, and hashes

    def to_proto(self) -> pb.Refiner:
        refiner = pb.Refiner(model=self.model)
        if self.start_step is not None:
            refiner.start_step = self.start_step
        if self.start_percentage is not None:
            refiner.start_step_percentage = self.start_percentage
        refiner.compare = self.compare
        if self.aesthetic_score is not None:
            refiner.aesthetic_score = self.aesthetic_score
        if self.negative_aesthetic_score is not None:
            refiner.negative_aesthetic_score = self.negative_aesthetic_score
        if self.prompt is not None:
            refiner.positive_prompt = self.prompt
        if self.negative_prompt is not None:
            refiner.negative_prompt = self.negative_prompt
        refiner.loras.extend(_loras(self.loras))
        return refiner


class GenerateOptions(TypedDict, total=False):
    """A request's fields besides the prompt (generation.proto, GenerateRequest). Absent, zero, empty or None:
    the server's default."""

    negative_prompt: str
    model: str  # AIR of the base model
    refiner: Refiner | None  # None: the base runs every step
    width: int
    height: int
    steps: int  # both stages together
    cfg_scale: float
    seed: int | None  # None: a random seed, reported on every Image
    scheduler: Scheduler | str | None
    number_results: int
    output_format: OutputFormat | str | None
    preview_every: int  # a Preview every n steps
    priority: int  # -100..100, higher first
    request_id: str  # echoed on every event and in the server's log; empty: the server assigns one
    loras: Sequence[Lora]  # for the base model alone, at most 4; the refiner takes Refiner(loras=...)
    prompt_weighting: PromptWeighting | str | None  # None or NONE: plain text
    # Starting from an image (README "Starting from an image"): bytes, a path, or a reference ("sha256:...").
    # generate_request puts one of at most 96 KiB inline; Client.generate also uploads a larger one for you.
    image: ImageSource | None  # img2img (with mask: inpainting); None: text-to-image
    strength: float | None  # (0, 1]: the last floor(steps x strength) steps run; None: the server's 0.8
    mask: ImageSource | None  # white repaints, black keeps; the image's size
    mask_blur: int  # px of blur on the mask's edge for the paste-back, 0..64
    mask_margin: int  # > 0: inpaint only a crop around the mask, grown by this many px; 0..512
    keep_results: timedelta | float | None  # keep the results on the server (seconds): Image.reference


def generate_request(prompt: str, **options: Unpack[GenerateOptions]) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        positive_prompt=prompt,
        negative_prompt=options.get("negative_prompt", ""),
        model=options.get("model", ""),
        width=options.get("width", 0),
        height=options.get("height", 0),
        steps=options.get("steps", 0),
        cfg_scale=options.get("cfg_scale", 0.0),
        number_results=options.get("number_results", 0),
        preview_every=options.get("preview_every", 0),
        priority=options.get("priority", 0),
        request_id=options.get("request_id", ""),
    )
    if (seed := options.get("seed")) is not None:
        request.seed = seed
    if (scheduler := options.get("scheduler")) is not None:
        request.scheduler = _SCHEDULERS[Scheduler(scheduler)]
    if (output_format := options.get("output_format")) is not None:
        request.output_format = _FORMATS[OutputFormat(output_format)]
    if (refiner := options.get("refiner")) is not None:
        request.refiner.CopyFrom(refiner.to_proto())
    request.loras.extend(_loras(options.get("loras", ())))
    if (weighting := options.get("prompt_weighting")) is not None:
        request.prompt_weighting = _WEIGHTINGS[PromptWeighting(weighting)]
    _start_from_image(request, options)
    return request


def _start_from_image(request: pb.GenerateRequest, options: GenerateOptions) -> None:
    if (image := options.get("image")) is not None:
        request.image.CopyFrom(image_input(image, "image"))
    if (mask := options.get("mask")) is not None:
        request.mask.CopyFrom(image_input(mask, "mask"))
    if (strength := options.get("strength")) is not None:
        request.strength = strength
    request.mask_blur = options.get("mask_blur", 0)
    request.mask_margin = options.get("mask_margin", 0)
    if (keep := options.get("keep_results")) is not None:
        request.keep_results.CopyFrom(duration(keep, "keep_results"))


ImageField = Literal["image", "mask"]
_IMAGE_FIELDS: tuple[ImageField, ...] = ("image", "mask")


def to_upload(options: GenerateOptions) -> dict[ImageField, ImageSource]:
    """The `image` and `mask` of `options` too large to go inline: a client uploads them before sending."""
    return {
        field: source for field in _IMAGE_FIELDS if (source := options.get(field)) is not None and needs_upload(source)
    }


def with_references(options: GenerateOptions, references: dict[ImageField, str]) -> GenerateOptions:
    """`options` with the uploaded images named by their references."""
    updated = options.copy()
    for field, reference in references.items():
        updated[field] = reference
    return updated


def pair_of(options: GenerateOptions) -> tuple[str, str]:
    """The model pair a request of `options` asks for, as the pair-affinity header names it."""
    refiner = options.get("refiner")
    return options.get("model", ""), refiner.model if refiner is not None else ""
