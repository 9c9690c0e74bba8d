"""What the model service's calls return (`Client.pull_model`, `list_models`, `pin_model`, `unpin_model`,
`verify_model`, `delete_model`): small immutable values, and the functions that make them from the protobuf
responses, shared by `Client` and `AsyncClient`.

`pull_model` yields `PullProgress` while it downloads (or hashes) and then the `ModelInfo` it pulled;
`verify_model` yields `PullProgress` while it reads a model and then one `VerifyResult` per model. Enumerations
read as `events.py`'s do: a value this client does not know yet reads as UNSPECIFIED.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from google.protobuf import timestamp_pb2

from refinery.client.events import proto_enum
from refinery.v1 import models_pb2 as pb


class Architecture(StrEnum):
    """What a model's weights are, read from the weights themselves (never from its name)."""

    UNSPECIFIED = "unspecified"
    SDXL_BASE = "sdxl_base"
    SDXL_REFINER = "sdxl_refiner"
    SDXL_INPAINT = "sdxl_inpaint"  # a 9-channel SDXL inpainting base: it needs an image and a mask
    SD1 = "sd1"
    SD2 = "sd2"
    SD3 = "sd3"
    FLUX = "flux"
    UNKNOWN = "unknown"  # the server read the weights and recognised no architecture


class ModelKind(StrEnum):
    """A whole model, or a LoRA (whose `architecture` is the model it was trained on)."""

    UNSPECIFIED = "unspecified"
    CHECKPOINT = "checkpoint"
    LORA = "lora"


class Verdict(StrEnum):
    UNSPECIFIED = "unspecified"
    INTACT = "intact"
    REPAIRED = "repaired"  # a damaged file was set aside and the model fetched again
    CORRUPT = "corrupt"  # still damaged: it could not be fetched again
    SKIPPED = "skipped"  # a local model: nothing to check it against


@dataclass(frozen=True)
class ModelInfo:
    """A cached model."""

    model: str  # canonical AIR
    size_bytes: int
    architecture: Architecture
    added: datetime  # UTC
    last_used: datetime  # UTC
    pinned: bool  # exempt from the cache quota's eviction
    resident: bool  # loaded on a device of the server that answered
    sha256: str
    in_use: bool  # held by a request or a pull right now
    # A server older than LoRAs does not say: its models are all checkpoints, and read as such.
    kind: ModelKind = ModelKind.CHECKPOINT
    trigger_words: tuple[str, ...] = ()  # a LoRA's, as its source lists them


@dataclass(frozen=True)
class ModelList:
    models: tuple[ModelInfo, ...]
    total_bytes: int  # on disk; files shared by several models counted once
    quota_bytes: int  # 0: no quota


@dataclass(frozen=True)
class PullProgress:
    """Bytes of one model downloaded, or (`verifying`) read and hashed, so far."""

    model: str  # empty from a server that does not say (a pull's progress is of the model asked for)
    bytes_done: int
    bytes_total: int  # 0 when unknown
    bytes_per_second: float
    verifying: bool = False
    file: str = ""
    # What arrived over the network this time (`bytes_done` counts what an interrupted pull had left too);
    # None from a server that does not say.
    bytes_transferred: int | None = None


@dataclass(frozen=True)
class VerifyResult:
    model: str
    verdict: Verdict
    bytes_checked: int
    message: str  # what was wrong (REPAIRED, CORRUPT) or why it was skipped


PullEvent = PullProgress | ModelInfo
VerifyEvent = PullProgress | VerifyResult


def model_info(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        info.model,
        info.size_bytes,
        proto_enum(Architecture, pb.Architecture, "ARCHITECTURE_", info.architecture),
        _utc(info.added),
        _utc(info.last_used),
        info.pinned,
        info.resident,
        info.sha256,
        info.in_use,
        _kind(info.kind),
        tuple(info.trigger_words),
    )


def _kind(value: int) -> ModelKind:
    kind = proto_enum(ModelKind, pb.ModelKind, "MODEL_KIND_", value)
    # Unset: a server from before LoRAs, where every model is a checkpoint. A kind added later stays UNSPECIFIED.
    return ModelKind.CHECKPOINT if value == pb.MODEL_KIND_UNSPECIFIED else kind


def model_list(response: pb.ListModelsResponse) -> ModelList:
    return ModelList(tuple(model_info(m) for m in response.models), response.total_bytes, response.quota_bytes)


def pull_progress(progress: pb.PullProgress) -> PullProgress:
    transferred = progress.bytes_transferred if progress.HasField("bytes_transferred") else None
    return PullProgress(
        progress.model,
        progress.bytes_done,
        progress.bytes_total,
        progress.bytes_per_second,
        progress.verifying,
        progress.file,
        transferred,
    )


def pull_event(response: pb.PullModelResponse) -> PullEvent | None:
    """None for an event this client does not know (a newer server's)."""
    kind = response.WhichOneof("event")
    if kind == "progress":
        return pull_progress(response.progress)
    if kind == "model":
        return model_info(response.model)
    return None


def verify_event(response: pb.VerifyModelResponse) -> VerifyEvent | None:
    kind = response.WhichOneof("event")
    if kind == "progress":
        return pull_progress(response.progress)
    if kind == "result":
        r = response.result
        verdict = proto_enum(Verdict, pb.VerifyResult.Verdict, "VERDICT_", r.verdict)
        return VerifyResult(r.model, verdict, r.bytes_checked, r.message)
    return None


def pinned_model(response: pb.PinModelResponse | pb.UnpinModelResponse) -> ModelInfo:
    return model_info(response.model)


def freed_bytes(response: pb.DeleteModelResponse) -> int:
    return response.freed_bytes


def _utc(timestamp: timestamp_pb2.Timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)
