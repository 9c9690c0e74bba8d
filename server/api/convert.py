"""Domain values become protobuf responses, for all three services. (Requests go the other way in
`validation.py`.) Nothing below `server/api/` sees protobuf."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from modelstore import Architecture, CachedModel, DownloadProgress, Role
from refinery.v1 import generation_pb2 as gen_pb
from refinery.v1 import models_pb2 as models_pb
from refinery.v1 import status_pb2 as status_pb
from server import domain
from server.generation.compiling import CompileState, ShapeStatus
from server.scheduling.snapshot import DeviceSnapshot

_STAGES = {domain.Stage.BASE: gen_pb.STAGE_BASE, domain.Stage.REFINER: gen_pb.STAGE_REFINER}
_ROLES = {Role.BASE: gen_pb.MODEL_ROLE_BASE, Role.REFINER: gen_pb.MODEL_ROLE_REFINER}
_COMPILE_STATES = {
    CompileState.QUEUED: status_pb.CompiledShape.STATE_QUEUED,
    CompileState.COMPILING: status_pb.CompiledShape.STATE_COMPILING,
    CompileState.READY: status_pb.CompiledShape.STATE_READY,
    CompileState.FAILED: status_pb.CompiledShape.STATE_FAILED,
}
_PHASES = {
    domain.LoadPhase.DOWNLOADING: gen_pb.ModelLoading.PHASE_DOWNLOADING,
    domain.LoadPhase.VERIFYING: gen_pb.ModelLoading.PHASE_VERIFYING,
    domain.LoadPhase.LOADING: gen_pb.ModelLoading.PHASE_LOADING,
    domain.LoadPhase.READY: gen_pb.ModelLoading.PHASE_READY,
}
ARCHITECTURES: dict[Architecture, models_pb.Architecture] = {
    Architecture.SDXL_BASE: models_pb.ARCHITECTURE_SDXL_BASE,
    Architecture.SDXL_REFINER: models_pb.ARCHITECTURE_SDXL_REFINER,
    Architecture.SD1: models_pb.ARCHITECTURE_SD1,
    Architecture.SD2: models_pb.ARCHITECTURE_SD2,
    Architecture.SD3: models_pb.ARCHITECTURE_SD3,
    Architecture.FLUX: models_pb.ARCHITECTURE_FLUX,
    Architecture.UNKNOWN: models_pb.ARCHITECTURE_UNKNOWN,
}


# ---- GenerationService ------------------------------------------------------------------------------------


def generate_response(request_id: str, event: domain.JobEvent) -> gen_pb.GenerateResponse:
    """The stream message for one event."""
    if isinstance(event, domain.Queued):
        queued = gen_pb.Queued(position=event.position, queue_depth=event.queue_depth)
        return gen_pb.GenerateResponse(request_id=request_id, queued=queued)
    if isinstance(event, domain.ModelLoading):
        return gen_pb.GenerateResponse(request_id=request_id, model_loading=_model_loading(event))
    if isinstance(event, domain.Progress):
        return gen_pb.GenerateResponse(request_id=request_id, progress=_progress(event))
    if isinstance(event, domain.Preview):
        return gen_pb.GenerateResponse(request_id=request_id, preview=_preview(event))
    return gen_pb.GenerateResponse(request_id=request_id, image=_image(event))


def _model_loading(event: domain.ModelLoading) -> gen_pb.ModelLoading:
    return gen_pb.ModelLoading(
        model=event.model,
        role=_ROLES[event.role],
        phase=_PHASES[event.phase],
        bytes_done=event.bytes_done,
        bytes_total=event.bytes_total,
        bytes_per_second=event.bytes_per_second,
    )


def _progress(event: domain.Progress) -> gen_pb.Progress:
    elapsed = duration_pb2.Duration()
    elapsed.FromNanoseconds(int(event.elapsed_s * 1e9))
    return gen_pb.Progress(
        stage=_STAGES[event.stage],
        step=event.step,
        stage_steps=event.stage_steps,
        overall_step=event.overall_step,
        total_steps=event.total_steps,
        elapsed=elapsed,
        image_indices=list(event.image_indices),
    )


def _preview(event: domain.Preview) -> gen_pb.Preview:
    return gen_pb.Preview(
        stage=_STAGES[event.stage],
        step=event.step,
        overall_step=event.overall_step,
        image_index=event.image_index,
        data=event.data,
        mime_type=event.mime_type,
        width=event.width,
        height=event.height,
    )


def _image(event: domain.ImageResult) -> gen_pb.Image:
    return gen_pb.Image(
        data=event.data,
        mime_type=event.mime_type,
        seed=event.seed,
        index=event.index,
        width=event.width,
        height=event.height,
        base_steps=event.base_steps,
        refiner_steps=event.refiner_steps,
        model=event.model,
        refiner_model=event.refiner_model,
    )


# ---- ModelService -----------------------------------------------------------------------------------------


def model_info(model: CachedModel, *, resident: bool) -> models_pb.ModelInfo:
    info = models_pb.ModelInfo(
        model=model.air,
        size_bytes=model.size_bytes,
        architecture=ARCHITECTURES[model.architecture],
        pinned=model.pinned,
        resident=resident,
        sha256=model.sha256,
        in_use=model.in_use,
    )
    info.added.FromDatetime(model.added)
    info.last_used.FromDatetime(model.last_used)
    return info


def pull_progress(progress: DownloadProgress) -> models_pb.PullModelResponse:
    return models_pb.PullModelResponse(
        progress=models_pb.PullProgress(
            bytes_done=max(progress.bytes_done, 0),
            bytes_total=max(progress.bytes_total, 0),
            bytes_per_second=max(progress.rate_bps, 0.0),
            verifying=progress.verifying,
            file=progress.file,
        )
    )


# ---- ServerService ----------------------------------------------------------------------------------------


def device_status(device: DeviceSnapshot) -> status_pb.DeviceStatus:
    pairs = []
    for pair in device.pairs:
        last_used = timestamp_pb2.Timestamp()
        last_used.FromNanoseconds(int(pair.last_used_wall * 1e9))
        pairs.append(
            status_pb.ResidentPair(
                model=pair.key.base,
                refiner_model=pair.key.refiner or "",
                bytes=pair.bytes,
                active_jobs=pair.active,
                pinned=pair.pinned,
                last_used=last_used,
            )
        )
    return status_pb.DeviceStatus(
        name=device.name,
        budget_bytes=device.budget_bytes,
        resident_bytes=device.resident_bytes,
        allocated_bytes=device.allocated_bytes,
        pairs=pairs,
        jobs_running=device.jobs_running,
        tuning=device.tuning,
        compiled_shapes=[_compiled_shape(shape) for shape in device.compiled],
        compiled_unet_calls=device.unet_calls.get("compiled", 0),
        eager_unet_calls=device.unet_calls.get("eager", 0),
        busy_time=_duration(device.busy_s),
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _compiled_shape(shape: ShapeStatus) -> status_pb.CompiledShape:
    return status_pb.CompiledShape(
        model=shape.model,
        role=_ROLES[Role(shape.role)],
        width=shape.width,
        height=shape.height,
        max_images=shape.max_images,
        state=_COMPILE_STATES[shape.state],
        pinned=shape.pinned,
        compile_time=_duration(shape.seconds),
        error=shape.error,
    )
