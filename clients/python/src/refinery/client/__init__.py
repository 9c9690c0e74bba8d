"""A small typed client for Refinery's `GenerationService.Generate`: `Client` (see client.py for an example)
and `AsyncClient` for asyncio."""

from __future__ import annotations

from refinery.client.aio import AsyncClient
from refinery.client.channel import DEFAULT_MAX_RECEIVE_BYTES, TLS
from refinery.client.chunks import ImageAssembler
from refinery.client.client import DEFAULT_TARGET, Client, token_from_env
from refinery.client.errors import FieldViolation, RefineryError
from refinery.client.events import Branch, Event, Image, ModelLoading, Phase, Preview, Progress, Queued, Role, Stage
from refinery.client.metadata import PAIR_HEADER, pair_affinity
from refinery.client.request import GenerateOptions, OutputFormat, Refiner, Scheduler, generate_request

__all__ = [
    "DEFAULT_MAX_RECEIVE_BYTES",
    "DEFAULT_TARGET",
    "PAIR_HEADER",
    "TLS",
    "AsyncClient",
    "Branch",
    "Client",
    "Event",
    "FieldViolation",
    "GenerateOptions",
    "Image",
    "ImageAssembler",
    "ModelLoading",
    "OutputFormat",
    "Phase",
    "Preview",
    "Progress",
    "Queued",
    "Refiner",
    "RefineryError",
    "Role",
    "Scheduler",
    "Stage",
    "generate_request",
    "pair_affinity",
    "token_from_env",
]
