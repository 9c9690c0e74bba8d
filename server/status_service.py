"""`refinery.v1.ServerService`: what the server is doing right now, for operators and dashboards, and which
pairs it keeps loaded (PinPair / UnpinPair: `--pin` at run time)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf import timestamp_pb2

from modelstore import parse_air
from modelstore.errors import ModelStoreError
from refinery.v1 import status_pb2 as pb
from refinery.v1 import status_pb2_grpc as pb_grpc
from server.errors import FieldViolation, InvalidRequest, NotPinned
from server.residency import PairKey
from server.scheduler import DeviceStatus, Scheduler
from server.status import abort

log = logging.getLogger(__name__)

STATUS_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ServerService"].full_name

# GenerateRequest's model fields -> PinPairRequest's
_PIN_FIELDS = {"model": "model", "refiner.model": "refiner_model"}


class StatusService(pb_grpc.ServerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        status = self._scheduler.status()
        queue = pb.QueueStatus(
            depth=status.queue_depth, max_queue=status.max_queue, depth_by_priority=status.depth_by_priority
        )
        return pb.GetStatusResponse(
            devices=[_device(d) for d in status.devices], queue=queue, jobs_running=status.jobs_running
        )

    async def PinPair(self, request: pb.PinPairRequest, context: grpc.aio.ServicerContext) -> pb.PinPairResponse:
        try:
            key = _pair(request.model, request.refiner_model)
            await asyncio.wrap_future(self._scheduler.pin_pairs([key]))
            log.info("pinned %s on every device", key)
            return pb.PinPairResponse(devices=self._devices())
        except Exception as exc:
            if isinstance(exc, ModelStoreError) and exc.field in _PIN_FIELDS:
                exc.for_field(_PIN_FIELDS[exc.field])  # the scheduler names Generate's fields
            error = exc
        await abort(context, error, call=f"PinPair {request.model!r}+{request.refiner_model!r}")

    async def UnpinPair(self, request: pb.UnpinPairRequest, context: grpc.aio.ServicerContext) -> pb.UnpinPairResponse:
        try:
            key = _pair(request.model, request.refiner_model)
            if not self._scheduler.unpin_pair(key):
                raise NotPinned(f"{key} is not pinned on any device")
            log.info("unpinned %s", key)
            return pb.UnpinPairResponse(devices=self._devices())
        except Exception as exc:
            error = exc
        await abort(context, error, call=f"UnpinPair {request.model!r}+{request.refiner_model!r}")

    def _devices(self) -> list[pb.DeviceStatus]:
        return [_device(d) for d in self._scheduler.status().devices]


def _pair(model: str, refiner_model: str) -> PairKey:
    """The request's pair as canonical AIRs; errors name the request field."""
    if not model:
        raise InvalidRequest([FieldViolation("model", "required: the base's AIR")])
    canonical = []
    for field, text in (("model", model), ("refiner_model", refiner_model)):
        try:
            canonical.append(parse_air(text).canonical if text else None)
        except ModelStoreError as exc:
            raise exc.for_field(field) from None
    base, refiner = canonical
    assert base is not None
    return PairKey(base, refiner)


def _device(device: DeviceStatus) -> pb.DeviceStatus:
    pairs = []
    for pair in device.pairs:
        last_used = timestamp_pb2.Timestamp()
        last_used.FromNanoseconds(int(pair.last_used_wall * 1e9))
        pairs.append(
            pb.ResidentPair(
                model=pair.key.base,
                refiner_model=pair.key.refiner or "",
                bytes=pair.bytes,
                active_jobs=pair.active,
                pinned=pair.pinned,
                last_used=last_used,
            )
        )
    return pb.DeviceStatus(
        name=device.name,
        budget_bytes=device.budget_bytes,
        resident_bytes=device.resident_bytes,
        allocated_bytes=device.allocated_bytes,
        pairs=pairs,
        jobs_running=device.jobs_running,
    )
