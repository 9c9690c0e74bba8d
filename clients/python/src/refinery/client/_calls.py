"""The model and server services' calls as values: which method, what request, whether it administers, and
how its answer becomes the client's types. `Client` and `AsyncClient` each only carry such a call out (blocking
or on asyncio), so the two cannot drift apart in what they send or return.

Administration (pull, verify, pin, unpin, delete, `PinPair`, `UnpinPair`) is sent with the admin token; the
rest with the generation token (server/api/access.py's table; README "Security").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from refinery.client import models, status
from refinery.client.metadata import PAIR_HEADER, auth_metadata, bearer, pair_affinity
from refinery.v1 import models_pb2 as models_pb
from refinery.v1 import status_pb2 as status_pb

R = TypeVar("R")

_MODELS = "/refinery.v1.ModelService/"
_SERVER = "/refinery.v1.ServerService/"


@dataclass(frozen=True)
class Unary(Generic[R]):
    method: str  # "/package.Service/Method"
    request: Message
    response: type[Message]
    convert: Callable[[Any], R]
    admin: bool
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Streaming(Generic[R]):
    """A call that streams responses; `convert` gives None for one this client skips (an unknown event)."""

    method: str
    request: Message
    response: type[Message]
    convert: Callable[[Any], R | None]
    admin: bool
    metadata: tuple[tuple[str, str], ...] = ()


def metadata(call: Unary[Any] | Streaming[Any], token: str | None, admin_token: str | None) -> list[tuple[str, str]]:
    """What `call` sends besides its request: its own headers and the bearer token its kind needs."""
    return [*call.metadata, *auth_metadata(bearer(token, admin_token, admin=call.admin))]


def serialize(message: Message) -> bytes:
    return message.SerializeToString()


def pull_model(model: str, pin: bool) -> Streaming[models.PullEvent]:
    request = models_pb.PullModelRequest(model=model, pin=pin)
    return Streaming(_MODELS + "PullModel", request, models_pb.PullModelResponse, models.pull_event, admin=True)


def verify_model(model: str) -> Streaming[models.VerifyEvent]:
    request = models_pb.VerifyModelRequest(model=model)
    return Streaming(_MODELS + "VerifyModel", request, models_pb.VerifyModelResponse, models.verify_event, admin=True)


def list_models() -> Unary[models.ModelList]:
    request = models_pb.ListModelsRequest()
    return Unary(_MODELS + "ListModels", request, models_pb.ListModelsResponse, models.model_list, admin=False)


def pin_model(model: str) -> Unary[models.ModelInfo]:
    request = models_pb.PinModelRequest(model=model)
    return Unary(_MODELS + "PinModel", request, models_pb.PinModelResponse, models.pinned_model, admin=True)


def unpin_model(model: str) -> Unary[models.ModelInfo]:
    request = models_pb.UnpinModelRequest(model=model)
    return Unary(_MODELS + "UnpinModel", request, models_pb.UnpinModelResponse, models.pinned_model, admin=True)


def delete_model(model: str) -> Unary[int]:
    request = models_pb.DeleteModelRequest(model=model)
    return Unary(_MODELS + "DeleteModel", request, models_pb.DeleteModelResponse, models.freed_bytes, admin=True)


def get_status() -> Unary[status.ServerStatus]:
    request = status_pb.GetStatusRequest()
    return Unary(_SERVER + "GetStatus", request, status_pb.GetStatusResponse, status.server_status, admin=False)


def pin_pair(model: str, refiner_model: str, *, pin: bool) -> Unary[tuple[status.DeviceStatus, ...]]:
    # The pair-affinity header, as Generate sends it: behind a balancer that hashes on it, the pin lands on the
    # replica that this pair's requests go to.
    affinity = ((PAIR_HEADER, pair_affinity(model, refiner_model)),)
    if pin:
        request: Message = status_pb.PinPairRequest(model=model, refiner_model=refiner_model)
        return Unary(_SERVER + "PinPair", request, status_pb.PinPairResponse, status.devices_of, True, affinity)
    request = status_pb.UnpinPairRequest(model=model, refiner_model=refiner_model)
    return Unary(_SERVER + "UnpinPair", request, status_pb.UnpinPairResponse, status.devices_of, True, affinity)
