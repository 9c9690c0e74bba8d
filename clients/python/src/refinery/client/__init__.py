"""A small typed client for Refinery: `Client` (see client.py for an example) and `AsyncClient` for asyncio.
`generate` streams a generation's events (events.py), sent again when a lost replica refused it (resend.py), and
uploads an image to start from that is too large to go inline (images.py; `upload_image` alone); the model
service's and the server service's calls return the values of models.py and status.py."""

from __future__ import annotations

from refinery.client.aio import AsyncClient
from refinery.client.channel import DEFAULT_MAX_RECEIVE_BYTES, TLS
from refinery.client.chunks import ImageAssembler
from refinery.client.client import DEFAULT_TARGET, Client, token_from_env
from refinery.client.errors import FieldViolation, RefineryError
from refinery.client.events import (
    AppliedLora,
    Branch,
    Event,
    Image,
    ImageMode,
    ModelLoading,
    Phase,
    Preview,
    Progress,
    PromptTokens,
    Queued,
    Role,
    Stage,
)
from refinery.client.images import INLINE_LIMIT, ImageSource, UploadedImage
from refinery.client.metadata import PAIR_HEADER, pair_affinity
from refinery.client.models import (
    Architecture,
    ModelInfo,
    ModelKind,
    ModelList,
    PullEvent,
    PullProgress,
    Verdict,
    VerifyEvent,
    VerifyResult,
)
from refinery.client.request import (
    GenerateOptions,
    Lora,
    OutputFormat,
    PromptWeighting,
    Refiner,
    Scheduler,
    generate_request,
)
from refinery.client.resend import Resend, Resent
from refinery.client.status import (
    CompiledShape,
    CompileState,
    DeviceStatus,
    PinFailure,
    QueueStatus,
    ResidentPair,
    ServerStatus,
)

__all__ = [
    "DEFAULT_MAX_RECEIVE_BYTES",
    "DEFAULT_TARGET",
    "INLINE_LIMIT",
    "PAIR_HEADER",
    "TLS",
    "AppliedLora",
    "Architecture",
    "AsyncClient",
    "Branch",
    "Client",
    "CompileState",
    "CompiledShape",
    "DeviceStatus",
    "Event",
    "FieldViolation",
    "GenerateOptions",
    "Image",
    "ImageAssembler",
    "ImageMode",
    "ImageSource",
    "Lora",
    "ModelInfo",
    "ModelKind",
    "ModelList",
    "ModelLoading",
    "OutputFormat",
    "Phase",
    "PinFailure",
    "Preview",
    "Progress",
    "PromptTokens",
    "PromptWeighting",
    "PullEvent",
    "PullProgress",
    "QueueStatus",
    "Queued",
    "Refiner",
    "RefineryError",
    "Resend",
    "Resent",
    "ResidentPair",
    "Role",
    "Scheduler",
    "ServerStatus",
    "Stage",
    "UploadedImage",
    "Verdict",
    "VerifyEvent",
    "VerifyResult",
    "generate_request",
    "pair_affinity",
    "token_from_env",
]
