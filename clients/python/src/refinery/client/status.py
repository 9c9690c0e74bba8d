"""What the server service's calls return (`Client.status`, `pin_pair`, `unpin_pair`): a server's devices, the
pairs they hold, its queue, and the pinned pairs it could not load; with the functions that make them from
the protobuf responses, shared by `Client` and `AsyncClient`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import grpc

from refinery.client.events import Role, proto_enum
from refinery.v1 import generation_pb2 as generation_pb
from refinery.v1 import status_pb2 as pb

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class CompileState(StrEnum):
    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    COMPILING = "compiling"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class ResidentPair:
    model: str
    refiner_model: str  # "" for a base alone
    bytes: int
    active_jobs: int
    pinned: bool
    last_used: datetime  # UTC


@dataclass(frozen=True)
class CompiledShape:
    """A shape the device compiled (or is compiling) its UNet for."""

    model: str
    role: Role
    width: int
    height: int
    max_images: int
    state: CompileState
    pinned: bool
    compile_time: timedelta
    error: str  # why it FAILED


@dataclass(frozen=True)
class DeviceStatus:
    name: str  # "cuda:0", "cpu"
    budget_bytes: int
    resident_bytes: int
    allocated_bytes: int  # what the device's allocator holds; 0 where it does not say (a CPU)
    pairs: tuple[ResidentPair, ...]
    jobs_running: int
    tuning: str
    compiled_shapes: tuple[CompiledShape, ...]
    compiled_unet_calls: int
    eager_unet_calls: int
    busy_time: timedelta


@dataclass(frozen=True)
class QueueStatus:
    depth: int
    max_queue: int
    depth_by_priority: dict[int, int]  # only the priorities something waits at


@dataclass(frozen=True)
class PinFailure:
    """A pair the server was told to pin and could not load: it serves the others."""

    model: str
    refiner_model: str
    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class ServerStatus:
    devices: tuple[DeviceStatus, ...]
    queue: QueueStatus
    jobs_running: int
    pin_failures: tuple[PinFailure, ...]


def server_status(response: pb.GetStatusResponse) -> ServerStatus:
    queue = response.queue
    return ServerStatus(
        devices_of(response),
        QueueStatus(queue.depth, queue.max_queue, dict(queue.depth_by_priority)),
        response.jobs_running,
        tuple(_pin_failure(f) for f in response.pin_failures),
    )


def devices_of(response: pb.GetStatusResponse | pb.PinPairResponse | pb.UnpinPairResponse) -> tuple[DeviceStatus, ...]:
    return tuple(_device(d) for d in response.devices)


def _device(device: pb.DeviceStatus) -> DeviceStatus:
    return DeviceStatus(
        device.name,
        device.budget_bytes,
        device.resident_bytes,
        device.allocated_bytes,
        tuple(_pair(p) for p in device.pairs),
        device.jobs_running,
        device.tuning,
        tuple(_shape(s) for s in device.compiled_shapes),
        device.compiled_unet_calls,
        device.eager_unet_calls,
        device.busy_time.ToTimedelta(),
    )


def _pair(pair: pb.ResidentPair) -> ResidentPair:
    last_used = pair.last_used.ToDatetime(tzinfo=UTC)
    return ResidentPair(pair.model, pair.refiner_model, pair.bytes, pair.active_jobs, pair.pinned, last_used)


def _shape(shape: pb.CompiledShape) -> CompiledShape:
    return CompiledShape(
        shape.model,
        proto_enum(Role, generation_pb.ModelRole, "MODEL_ROLE_", shape.role),
        shape.width,
        shape.height,
        shape.max_images,
        proto_enum(CompileState, pb.CompiledShape.State, "STATE_", shape.state),
        shape.pinned,
        shape.compile_time.ToTimedelta(),
        shape.error,
    )


def _pin_failure(failure: pb.PinFailure) -> PinFailure:
    code = _CODES.get(failure.error.code, grpc.StatusCode.UNKNOWN)
    return PinFailure(failure.model, failure.refiner_model, code, failure.error.message)
