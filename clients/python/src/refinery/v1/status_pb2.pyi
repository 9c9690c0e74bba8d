import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from refinery.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PinPairRequest(_message.Message):
    __slots__ = ("model", "refiner_model")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFINER_MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    refiner_model: str
    def __init__(self, model: _Optional[str] = ..., refiner_model: _Optional[str] = ...) -> None: ...

class PinPairResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ...) -> None: ...

class UnpinPairRequest(_message.Message):
    __slots__ = ("model", "refiner_model")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFINER_MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    refiner_model: str
    def __init__(self, model: _Optional[str] = ..., refiner_model: _Optional[str] = ...) -> None: ...

class UnpinPairResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("devices", "queue", "jobs_running", "pin_failures")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    JOBS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    PIN_FAILURES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    queue: QueueStatus
    jobs_running: int
    pin_failures: _containers.RepeatedCompositeFieldContainer[PinFailure]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ..., queue: _Optional[_Union[QueueStatus, _Mapping]] = ..., jobs_running: _Optional[int] = ..., pin_failures: _Optional[_Iterable[_Union[PinFailure, _Mapping]]] = ...) -> None: ...

class PinFailure(_message.Message):
    __slots__ = ("model", "refiner_model", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFINER_MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    refiner_model: str
    error: _status_pb2.Status
    def __init__(self, model: _Optional[str] = ..., refiner_model: _Optional[str] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("name", "budget_bytes", "resident_bytes", "allocated_bytes", "pairs", "jobs_running", "tuning", "compiled_shapes", "compiled_unet_calls", "eager_unet_calls", "busy_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    JOBS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    TUNING_FIELD_NUMBER: _ClassVar[int]
    COMPILED_SHAPES_FIELD_NUMBER: _ClassVar[int]
    COMPILED_UNET_CALLS_FIELD_NUMBER: _ClassVar[int]
    EAGER_UNET_CALLS_FIELD_NUMBER: _ClassVar[int]
    BUSY_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    budget_bytes: int
    resident_bytes: int
    allocated_bytes: int
    pairs: _containers.RepeatedCompositeFieldContainer[ResidentPair]
    jobs_running: int
    tuning: str
    compiled_shapes: _containers.RepeatedCompositeFieldContainer[CompiledShape]
    compiled_unet_calls: int
    eager_unet_calls: int
    busy_time: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., pairs: _Optional[_Iterable[_Union[ResidentPair, _Mapping]]] = ..., jobs_running: _Optional[int] = ..., tuning: _Optional[str] = ..., compiled_shapes: _Optional[_Iterable[_Union[CompiledShape, _Mapping]]] = ..., compiled_unet_calls: _Optional[int] = ..., eager_unet_calls: _Optional[int] = ..., busy_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CompiledShape(_message.Message):
    __slots__ = ("model", "role", "width", "height", "max_images", "state", "pinned", "compile_time", "error", "text_tokens")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[CompiledShape.State]
        STATE_QUEUED: _ClassVar[CompiledShape.State]
        STATE_COMPILING: _ClassVar[CompiledShape.State]
        STATE_READY: _ClassVar[CompiledShape.State]
        STATE_FAILED: _ClassVar[CompiledShape.State]
    STATE_UNSPECIFIED: CompiledShape.State
    STATE_QUEUED: CompiledShape.State
    STATE_COMPILING: CompiledShape.State
    STATE_READY: CompiledShape.State
    STATE_FAILED: CompiledShape.State
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    COMPILE_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    role: _generation_pb2.ModelRole
    width: int
    height: int
    max_images: int
    state: CompiledShape.State
    pinned: bool
    compile_time: _duration_pb2.Duration
    error: str
    text_tokens: int
    def __init__(self, model: _Optional[str] = ..., role: _Optional[_Union[_generation_pb2.ModelRole, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., max_images: _Optional[int] = ..., state: _Optional[_Union[CompiledShape.State, str]] = ..., pinned: _Optional[bool] = ..., compile_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[str] = ..., text_tokens: _Optional[int] = ...) -> None: ...

class ResidentPair(_message.Message):
    __slots__ = ("model", "refiner_model", "bytes", "active_jobs", "pinned", "last_used")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFINER_MODEL_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_JOBS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    model: str
    refiner_model: str
    bytes: int
    active_jobs: int
    pinned: bool
    last_used: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., refiner_model: _Optional[str] = ..., bytes: _Optional[int] = ..., active_jobs: _Optional[int] = ..., pinned: _Optional[bool] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class QueueStatus(_message.Message):
    __slots__ = ("depth", "max_queue", "depth_by_priority")
    class DepthByPriorityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_BY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    depth: int
    max_queue: int
    depth_by_priority: _containers.ScalarMap[int, int]
    def __init__(self, depth: _Optional[int] = ..., max_queue: _Optional[int] = ..., depth_by_priority: _Optional[_Mapping[int, int]] = ...) -> None: ...
