import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Architecture(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARCHITECTURE_UNSPECIFIED: _ClassVar[Architecture]
    ARCHITECTURE_SDXL_BASE: _ClassVar[Architecture]
    ARCHITECTURE_SDXL_REFINER: _ClassVar[Architecture]
    ARCHITECTURE_SD1: _ClassVar[Architecture]
    ARCHITECTURE_SD2: _ClassVar[Architecture]
    ARCHITECTURE_SD3: _ClassVar[Architecture]
    ARCHITECTURE_FLUX: _ClassVar[Architecture]
    ARCHITECTURE_UNKNOWN: _ClassVar[Architecture]
    ARCHITECTURE_SDXL_INPAINT: _ClassVar[Architecture]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_CHECKPOINT: _ClassVar[ModelKind]
    MODEL_KIND_LORA: _ClassVar[ModelKind]
ARCHITECTURE_UNSPECIFIED: Architecture
ARCHITECTURE_SDXL_BASE: Architecture
ARCHITECTURE_SDXL_REFINER: Architecture
ARCHITECTURE_SD1: Architecture
ARCHITECTURE_SD2: Architecture
ARCHITECTURE_SD3: Architecture
ARCHITECTURE_FLUX: Architecture
ARCHITECTURE_UNKNOWN: Architecture
ARCHITECTURE_SDXL_INPAINT: Architecture
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_CHECKPOINT: ModelKind
MODEL_KIND_LORA: ModelKind

class PullModelRequest(_message.Message):
    __slots__ = ("model", "pin")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    model: str
    pin: bool
    def __init__(self, model: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class PullModelResponse(_message.Message):
    __slots__ = ("progress", "model")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    progress: PullProgress
    model: ModelInfo
    def __init__(self, progress: _Optional[_Union[PullProgress, _Mapping]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "bytes_per_second", "verifying", "file", "bytes_transferred", "model")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    VERIFYING_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    bytes_per_second: float
    verifying: bool
    file: str
    bytes_transferred: int
    model: str
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_per_second: _Optional[float] = ..., verifying: _Optional[bool] = ..., file: _Optional[str] = ..., bytes_transferred: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "size_bytes", "architecture", "added", "last_used", "pinned", "resident", "sha256", "in_use", "kind", "trigger_words")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_WORDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    size_bytes: int
    architecture: Architecture
    added: _timestamp_pb2.Timestamp
    last_used: _timestamp_pb2.Timestamp
    pinned: bool
    resident: bool
    sha256: str
    in_use: bool
    kind: ModelKind
    trigger_words: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., size_bytes: _Optional[int] = ..., architecture: _Optional[_Union[Architecture, str]] = ..., added: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pinned: _Optional[bool] = ..., resident: _Optional[bool] = ..., sha256: _Optional[str] = ..., in_use: _Optional[bool] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., trigger_words: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "total_bytes", "quota_bytes")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    total_bytes: int
    quota_bytes: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class PinModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PinModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class UnpinModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnpinModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class VerifyModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VerifyModelResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: PullProgress
    result: VerifyResult
    def __init__(self, progress: _Optional[_Union[PullProgress, _Mapping]] = ..., result: _Optional[_Union[VerifyResult, _Mapping]] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("model", "verdict", "bytes_checked", "message")
    class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VERDICT_UNSPECIFIED: _ClassVar[VerifyResult.Verdict]
        VERDICT_INTACT: _ClassVar[VerifyResult.Verdict]
        VERDICT_REPAIRED: _ClassVar[VerifyResult.Verdict]
        VERDICT_CORRUPT: _ClassVar[VerifyResult.Verdict]
        VERDICT_SKIPPED: _ClassVar[VerifyResult.Verdict]
    VERDICT_UNSPECIFIED: VerifyResult.Verdict
    VERDICT_INTACT: VerifyResult.Verdict
    VERDICT_REPAIRED: VerifyResult.Verdict
    VERDICT_CORRUPT: VerifyResult.Verdict
    VERDICT_SKIPPED: VerifyResult.Verdict
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    BYTES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    verdict: VerifyResult.Verdict
    bytes_checked: int
    message: str
    def __init__(self, model: _Optional[str] = ..., verdict: _Optional[_Union[VerifyResult.Verdict, str]] = ..., bytes_checked: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
