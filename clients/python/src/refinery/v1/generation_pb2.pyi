import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULER_UNSPECIFIED: _ClassVar[Scheduler]
    SCHEDULER_EULER: _ClassVar[Scheduler]
    SCHEDULER_EULER_ANCESTRAL: _ClassVar[Scheduler]
    SCHEDULER_DDIM: _ClassVar[Scheduler]
    SCHEDULER_DPMPP_2M: _ClassVar[Scheduler]
    SCHEDULER_DPMPP_2M_KARRAS: _ClassVar[Scheduler]
    SCHEDULER_UNIPC: _ClassVar[Scheduler]

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JPEG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_WEBP: _ClassVar[OutputFormat]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_BASE: _ClassVar[Stage]
    STAGE_REFINER: _ClassVar[Stage]

class Branch(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BRANCH_UNSPECIFIED: _ClassVar[Branch]
    BRANCH_BASE_ONLY: _ClassVar[Branch]

class PromptWeighting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMPT_WEIGHTING_UNSPECIFIED: _ClassVar[PromptWeighting]
    PROMPT_WEIGHTING_COMPEL: _ClassVar[PromptWeighting]
    PROMPT_WEIGHTING_A1111: _ClassVar[PromptWeighting]

class ModelRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_ROLE_UNSPECIFIED: _ClassVar[ModelRole]
    MODEL_ROLE_BASE: _ClassVar[ModelRole]
    MODEL_ROLE_REFINER: _ClassVar[ModelRole]
    MODEL_ROLE_LORA: _ClassVar[ModelRole]

class ImageMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_MODE_UNSPECIFIED: _ClassVar[ImageMode]
    IMAGE_MODE_IMG2IMG: _ClassVar[ImageMode]
    IMAGE_MODE_INPAINT: _ClassVar[ImageMode]
SCHEDULER_UNSPECIFIED: Scheduler
SCHEDULER_EULER: Scheduler
SCHEDULER_EULER_ANCESTRAL: Scheduler
SCHEDULER_DDIM: Scheduler
SCHEDULER_DPMPP_2M: Scheduler
SCHEDULER_DPMPP_2M_KARRAS: Scheduler
SCHEDULER_UNIPC: Scheduler
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_JPEG: OutputFormat
OUTPUT_FORMAT_WEBP: OutputFormat
STAGE_UNSPECIFIED: Stage
STAGE_BASE: Stage
STAGE_REFINER: Stage
BRANCH_UNSPECIFIED: Branch
BRANCH_BASE_ONLY: Branch
PROMPT_WEIGHTING_UNSPECIFIED: PromptWeighting
PROMPT_WEIGHTING_COMPEL: PromptWeighting
PROMPT_WEIGHTING_A1111: PromptWeighting
MODEL_ROLE_UNSPECIFIED: ModelRole
MODEL_ROLE_BASE: ModelRole
MODEL_ROLE_REFINER: ModelRole
MODEL_ROLE_LORA: ModelRole
IMAGE_MODE_UNSPECIFIED: ImageMode
IMAGE_MODE_IMG2IMG: ImageMode
IMAGE_MODE_INPAINT: ImageMode

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "positive_prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "seed", "scheduler", "number_results", "output_format", "refiner", "preview_every", "priority", "loras", "prompt_weighting", "image", "strength", "mask", "mask_blur", "mask_margin", "keep_results")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    NUMBER_RESULTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    REFINER_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_BLUR_FIELD_NUMBER: _ClassVar[int]
    MASK_MARGIN_FIELD_NUMBER: _ClassVar[int]
    KEEP_RESULTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    positive_prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    scheduler: Scheduler
    number_results: int
    output_format: OutputFormat
    refiner: Refiner
    preview_every: int
    priority: int
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    prompt_weighting: PromptWeighting
    image: ImageInput
    strength: float
    mask: ImageInput
    mask_blur: int
    mask_margin: int
    keep_results: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., positive_prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., seed: _Optional[int] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., number_results: _Optional[int] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., refiner: _Optional[_Union[Refiner, _Mapping]] = ..., preview_every: _Optional[int] = ..., priority: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ..., prompt_weighting: _Optional[_Union[PromptWeighting, str]] = ..., image: _Optional[_Union[ImageInput, _Mapping]] = ..., strength: _Optional[float] = ..., mask: _Optional[_Union[ImageInput, _Mapping]] = ..., mask_blur: _Optional[int] = ..., mask_margin: _Optional[int] = ..., keep_results: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("reference", "data")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    reference: str
    data: bytes
    def __init__(self, reference: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadImageRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("size_bytes", "sha256", "keep_for")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    KEEP_FOR_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    sha256: str
    keep_for: _duration_pb2.Duration
    def __init__(self, size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., keep_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class UploadImageResponse(_message.Message):
    __slots__ = ("reference", "mime_type", "width", "height", "size_bytes", "expires")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    reference: str
    mime_type: str
    width: int
    height: int
    size_bytes: int
    expires: _timestamp_pb2.Timestamp
    def __init__(self, reference: _Optional[str] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., size_bytes: _Optional[int] = ..., expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Lora(_message.Message):
    __slots__ = ("model", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    weight: float
    def __init__(self, model: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Refiner(_message.Message):
    __slots__ = ("model", "start_step", "start_step_percentage", "compare", "aesthetic_score", "negative_aesthetic_score", "positive_prompt", "negative_prompt", "loras")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    START_STEP_PERCENTAGE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_FIELD_NUMBER: _ClassVar[int]
    AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    start_step: int
    start_step_percentage: int
    compare: bool
    aesthetic_score: float
    negative_aesthetic_score: float
    positive_prompt: str
    negative_prompt: str
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    def __init__(self, model: _Optional[str] = ..., start_step: _Optional[int] = ..., start_step_percentage: _Optional[int] = ..., compare: _Optional[bool] = ..., aesthetic_score: _Optional[float] = ..., negative_aesthetic_score: _Optional[float] = ..., positive_prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "queued", "model_loading", "progress", "preview", "image", "image_chunk")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADING_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: Queued
    model_loading: ModelLoading
    progress: Progress
    preview: Preview
    image: Image
    image_chunk: ImageChunk
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., model_loading: _Optional[_Union[ModelLoading, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., image_chunk: _Optional[_Union[ImageChunk, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position", "queue_depth")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    position: int
    queue_depth: int
    def __init__(self, position: _Optional[int] = ..., queue_depth: _Optional[int] = ...) -> None: ...

class ModelLoading(_message.Message):
    __slots__ = ("model", "role", "phase", "bytes_done", "bytes_total", "bytes_per_second")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[ModelLoading.Phase]
        PHASE_DOWNLOADING: _ClassVar[ModelLoading.Phase]
        PHASE_LOADING: _ClassVar[ModelLoading.Phase]
        PHASE_READY: _ClassVar[ModelLoading.Phase]
        PHASE_VERIFYING: _ClassVar[ModelLoading.Phase]
    PHASE_UNSPECIFIED: ModelLoading.Phase
    PHASE_DOWNLOADING: ModelLoading.Phase
    PHASE_LOADING: ModelLoading.Phase
    PHASE_READY: ModelLoading.Phase
    PHASE_VERIFYING: ModelLoading.Phase
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    model: str
    role: ModelRole
    phase: ModelLoading.Phase
    bytes_done: int
    bytes_total: int
    bytes_per_second: float
    def __init__(self, model: _Optional[str] = ..., role: _Optional[_Union[ModelRole, str]] = ..., phase: _Optional[_Union[ModelLoading.Phase, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_per_second: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "stage_steps", "overall_step", "total_steps", "elapsed", "image_indices", "branch")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    OVERALL_STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDICES_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    step: int
    stage_steps: int
    overall_step: int
    total_steps: int
    elapsed: _duration_pb2.Duration
    image_indices: _containers.RepeatedScalarFieldContainer[int]
    branch: Branch
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., stage_steps: _Optional[int] = ..., overall_step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., image_indices: _Optional[_Iterable[int]] = ..., branch: _Optional[_Union[Branch, str]] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("stage", "step", "overall_step", "image_index", "data", "mime_type", "width", "height", "branch")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OVERALL_STEP_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    step: int
    overall_step: int
    image_index: int
    data: bytes
    mime_type: str
    width: int
    height: int
    branch: Branch
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., overall_step: _Optional[int] = ..., image_index: _Optional[int] = ..., data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., branch: _Optional[_Union[Branch, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type", "seed", "index", "width", "height", "base_steps", "refiner_steps", "model", "refiner_model", "branch", "loras", "refiner_loras", "prompt_tokens", "reference", "reference_expires", "mode", "first_step")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BASE_STEPS_FIELD_NUMBER: _ClassVar[int]
    REFINER_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFINER_MODEL_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    REFINER_LORAS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    seed: int
    index: int
    width: int
    height: int
    base_steps: int
    refiner_steps: int
    model: str
    refiner_model: str
    branch: Branch
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    refiner_loras: _containers.RepeatedCompositeFieldContainer[Lora]
    prompt_tokens: _containers.RepeatedCompositeFieldContainer[PromptTokens]
    reference: str
    reference_expires: _timestamp_pb2.Timestamp
    mode: ImageMode
    first_step: int
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., seed: _Optional[int] = ..., index: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., base_steps: _Optional[int] = ..., refiner_steps: _Optional[int] = ..., model: _Optional[str] = ..., refiner_model: _Optional[str] = ..., branch: _Optional[_Union[Branch, str]] = ..., loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ..., refiner_loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ..., prompt_tokens: _Optional[_Iterable[_Union[PromptTokens, _Mapping]]] = ..., reference: _Optional[str] = ..., reference_expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mode: _Optional[_Union[ImageMode, str]] = ..., first_step: _Optional[int] = ...) -> None: ...

class PromptTokens(_message.Message):
    __slots__ = ("stage", "text_encoder", "positive_tokens", "negative_tokens", "chunks")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    text_encoder: str
    positive_tokens: int
    negative_tokens: int
    chunks: int
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., text_encoder: _Optional[str] = ..., positive_tokens: _Optional[int] = ..., negative_tokens: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("index", "offset", "total_size", "data", "image")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    total_size: int
    data: bytes
    image: Image
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...
