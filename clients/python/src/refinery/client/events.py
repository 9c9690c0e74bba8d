"""What `Client.generate` yields: one small immutable value per event of the Generate stream, in its order
(Queued, ModelLoading while a model is fetched or loaded, Progress per denoising step of each stage, Preview
when asked for, then one Image per result, reassembled when it came in chunks).

Enumerations are `StrEnum`s, so `event.stage == "refiner"` reads as it should; a value this client does not
know yet (a newer server) reads as UNSPECIFIED rather than failing the stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from refinery.v1 import generation_pb2 as pb


class Stage(StrEnum):
    UNSPECIFIED = "unspecified"
    BASE = "base"
    REFINER = "refiner"


class Role(StrEnum):
    UNSPECIFIED = "unspecified"
    BASE = "base"
    REFINER = "refiner"
    LORA = "lora"  # a LoRA of either stage; ModelLoading.model says which LoRA


class Branch(StrEnum):
    """Which image of a compare request an event belongs to (`Refiner(compare=True)`): MAIN is the request's
    own output (without compare, every event); BASE_ONLY the base's steps after the hand-off and the image the
    base makes alone."""

    MAIN = "main"
    BASE_ONLY = "base_only"


class ImageMode(StrEnum):
    """What a result started from: TEXT (noise), IMG2IMG (an image), INPAINT (an image and a mask);
    UNSPECIFIED only for a mode newer than this client."""

    UNSPECIFIED = "unspecified"
    TEXT = "text"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


class Phase(StrEnum):
    UNSPECIFIED = "unspecified"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    LOADING = "loading"
    READY = "ready"


@dataclass(frozen=True)
class Queued:
    request_id: str
    position: int  # 0: runs next
    queue_depth: int


@dataclass(frozen=True)
class ModelLoading:
    request_id: str
    model: str
    role: Role
    phase: Phase
    bytes_done: int  # while DOWNLOADING or VERIFYING
    bytes_total: int  # 0 when unknown
    bytes_per_second: float


@dataclass(frozen=True)
class Progress:
    request_id: str
    stage: Stage
    step: int  # 1-based within the stage
    stage_steps: int
    overall_step: int  # 1-based over both stages
    total_steps: int
    elapsed: timedelta
    image_indices: tuple[int, ...]
    branch: Branch = Branch.MAIN


@dataclass(frozen=True)
class Preview:
    request_id: str
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
class AppliedLora:
    """A LoRA as the server applied it: its canonical AIR and the weight used (1 where the request left it
    unset)."""

    model: str
    weight: float


@dataclass(frozen=True)
class PromptTokens:
    """What one text encoder of one stage read: the tokens of the prompt and of the negative prompt (without
    the start and end tokens, after any weighting syntax is removed) and the 75-token windows it ran (at least
    1; both sides are padded to the same count). The SDXL base has "text_encoder" and "text_encoder_2", the
    refiner only "text_encoder_2"."""

    stage: Stage
    text_encoder: str
    positive_tokens: int
    negative_tokens: int
    chunks: int


@dataclass(frozen=True)
class Image:
    request_id: str
    index: int
    data: bytes
    mime_type: str
    seed: int  # reproduces this result alone
    width: int
    height: int
    base_steps: int
    refiner_steps: int  # 0 without a refiner
    model: str
    refiner_model: str  # "" without a refiner
    branch: Branch = Branch.MAIN
    loras: tuple[AppliedLora, ...] = ()  # the base's, in request order
    refiner_loras: tuple[AppliedLora, ...] = ()  # the refiner's; none on a BASE_ONLY image
    prompt_tokens: tuple[PromptTokens, ...] = ()  # one per (stage, text encoder)
    # Starting from an image: base_steps and refiner_steps count the steps that ran (base_steps 0: refine-only),
    # first_step is the first of them on the steps-long grid (1 for text-to-image).
    mode: ImageMode = ImageMode.TEXT
    first_step: int = 1
    reference: str = ""  # with keep_results: "sha256:<hex>", to name this result in a later request
    reference_expires: datetime | None = None  # until when the server keeps it (UTC)


Event = Queued | ModelLoading | Progress | Preview | Image

_E = TypeVar("_E", bound=StrEnum)


def to_event(response: pb.GenerateResponse, image: pb.Image | None) -> Event | None:
    """The event a response carries; `image` is the whole result when this response completed one (see
    chunks.ImageAssembler). None for a chunk that completes nothing and for events this client does not know."""
    rid = response.request_id
    if image is not None:
        return _image(rid, image)
    kind = response.WhichOneof("event")
    if kind == "queued":
        q = response.queued
        return Queued(rid, q.position, q.queue_depth)
    if kind == "model_loading":
        m = response.model_loading
        return ModelLoading(
            rid,
            m.model,
            proto_enum(Role, pb.ModelRole, "MODEL_ROLE_", m.role),
            proto_enum(Phase, pb.ModelLoading.Phase, "PHASE_", m.phase),
            m.bytes_done,
            m.bytes_total,
            m.bytes_per_second,
        )
    if kind == "progress":
        p = response.progress
        return Progress(
            rid,
            proto_enum(Stage, pb.Stage, "STAGE_", p.stage),
            p.step,
            p.stage_steps,
            p.overall_step,
            p.total_steps,
            p.elapsed.ToTimedelta(),
            tuple(p.image_indices),
            _branch(p.branch),
        )
    if kind == "preview":
        v = response.preview
        stage = proto_enum(Stage, pb.Stage, "STAGE_", v.stage)
        return Preview(
            rid, stage, v.step, v.overall_step, v.image_index, v.data, v.mime_type, v.width, v.height, _branch(v.branch)
        )
    return None


def _image(rid: str, image: pb.Image) -> Image:
    return Image(
        rid,
        image.index,
        image.data,
        image.mime_type,
        image.seed,
        image.width,
        image.height,
        image.base_steps,
        image.refiner_steps,
        image.model,
        image.refiner_model,
        _branch(image.branch),
        _applied(image.loras),
        _applied(image.refiner_loras),
        tuple(_prompt_tokens(t) for t in image.prompt_tokens),
        _mode(image.mode),
        image.first_step or 1,  # a server older than image inputs: text-to-image from step 1
        image.reference,
        image.reference_expires.ToDatetime(UTC) if image.HasField("reference_expires") else None,
    )


def _applied(loras: Iterable[pb.Lora]) -> tuple[AppliedLora, ...]:
    # The server reports the weight it used; a server that leaves it unset means the contract's default.
    return tuple(AppliedLora(lora.model, lora.weight if lora.HasField("weight") else 1.0) for lora in loras)


def _prompt_tokens(tokens: pb.PromptTokens) -> PromptTokens:
    stage = proto_enum(Stage, pb.Stage, "STAGE_", tokens.stage)
    return PromptTokens(stage, tokens.text_encoder, tokens.positive_tokens, tokens.negative_tokens, tokens.chunks)


def _mode(value: int) -> ImageMode:
    if value == pb.IMAGE_MODE_UNSPECIFIED:  # the contract's text-to-image
        return ImageMode.TEXT
    return proto_enum(ImageMode, pb.ImageMode, "IMAGE_MODE_", value)


def _branch(value: int) -> Branch:
    return Branch.BASE_ONLY if value == pb.BRANCH_BASE_ONLY else Branch.MAIN


def proto_enum(cls: type[_E], proto: EnumTypeWrapper, prefix: str, value: int) -> _E:
    """The `StrEnum` member named like the protobuf value without its prefix (`STAGE_BASE` -> `base`); every
    such enumeration of the client has an UNSPECIFIED member."""
    try:
        return cls(proto.Name(value).removeprefix(prefix).lower())
    except ValueError:  # a value added to the contract after this client was built
        return cls("unspecified")
