"""`refinery.v1.ServerService`: what the server is doing right now, for operators and dashboards, and which
pairs it keeps loaded (PinPair / UnpinPair: `--pin` at run time)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from modelstore import Role
from refinery.v1 import status_pb2 as pb
from refinery.v1 import status_pb2_grpc as pb_grpc
from server.api import local_models
from server.api.boundary import ModelField, rpc
from server.api.convert import device_status, server_status
from server.api.validation import pair_from_request
from server.core.domain import PairKey
from server.core.errors import NotPinned
from server.core.logs import quoted
from server.core.pins import PinFailures
from server.scheduling import Engine

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ServerService"]
SERVICE_NAME = SERVICE.full_name


def _pair_fields(_servicer: object, request: pb.PinPairRequest) -> Sequence[ModelField]:
    return (
        ModelField("model", request.model, Role.BASE),
        ModelField("refiner_model", request.refiner_model, Role.REFINER),
    )


def _target(request: pb.PinPairRequest) -> str:
    return quoted(f"{request.model}+{request.refiner_model}")


class ServerService(pb_grpc.ServerServiceServicer):
    def __init__(
        self,
        scheduler: Engine,
        *,
        local_roots: Sequence[Path],
        pin_failures: PinFailures,
        on_pinned: Callable[[PairKey], Awaitable[None]],
    ) -> None:
        self._scheduler = scheduler
        self._local_roots = tuple(local_roots)
        # Start-up pins that failed (reported by GetStatus), and who hears that PinPair loaded a pair.
        self._pin_failures = pin_failures
        self._on_pinned = on_pinned

    @rpc("GetStatus")
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        return server_status(self._scheduler.snapshot(), self._pin_failures.snapshot())

    @rpc("PinPair", describe=_target, models=_pair_fields)
    async def PinPair(self, request: pb.PinPairRequest, context: grpc.aio.ServicerContext) -> pb.PinPairResponse:
        local_models.canonicalize(request, ("model", "refiner_model"), self._local_roots)
        key = pair_from_request(request)
        await asyncio.wrap_future(self._scheduler.pin([key]))
        log.info("pinned %s on every device", key)
        await self._on_pinned(key)
        return pb.PinPairResponse(devices=self._devices())

    @rpc("UnpinPair", describe=_target, models=_pair_fields)
    async def UnpinPair(self, request: pb.UnpinPairRequest, context: grpc.aio.ServicerContext) -> pb.UnpinPairResponse:
        key = pair_from_request(request)
        if not self._scheduler.unpin(key):
            raise NotPinned(f"{key} is not pinned on any device")
        log.info("unpinned %s", key)
        return pb.UnpinPairResponse(devices=self._devices())

    def _devices(self) -> list[pb.DeviceStatus]:
        return [device_status(d) for d in self._scheduler.snapshot().devices]
