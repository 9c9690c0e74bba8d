"""Domain values become protobuf responses, for all three services. (Requests go the other way in
`validation.py`.) Nothing below `server/api/` sees protobuf."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

from google.protobuf import timestamp_pb2

from modelstore import Architecture, CachedModel, DownloadProgress, ModelKind, Role, Verdict, Verification
from refinery.v1 import generation_pb2 as gen_pb
from refinery.v1 import models_pb2 as models_pb
from refinery.v1 import status_pb2 as status_pb
from server.api.boundary import ModelField, duration, rpc_error_for
from server.core import domain
from server.core.pins import PinFailure
from server.generation import CompileState, ShapeStatus
from server.scheduling import DeviceSnapshot, SchedulerSnapshot

_STAGES = {domain.Stage.BASE: gen_pb.STAGE_BASE, domain.Stage.REFINER: gen_pb.STAGE_REFINER}
_BRANCHES = {domain.Branch.MAIN: gen_pb.BRANCH_UNSPECIFIED, domain.Branch.BASE_ONLY: gen_pb.BRANCH_BASE_ONLY}
_MODES = {
    domain.ImageMode.TEXT: gen_pb.IMAGE_MODE_UNSPECIFIED,
    domain.ImageMode.IMG2IMG: gen_pb.IMAGE_MODE_IMG2IMG,
    domain.ImageMode.INPAINT: gen_pb.IMAGE_MODE_INPAINT,
}
_ROLES = {Role.BASE: gen_pb.MODEL_ROLE_BASE, Role.REFINER: gen_pb.MODEL_ROLE_REFINER, Role.LORA: gen_pb.MODEL_ROLE_LORA}
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
    Architecture.SDXL_INPAINT: models_pb.ARCHITECTURE_SDXL_INPAINT,
    Architecture.SD1: models_pb.ARCHITECTURE_SD1,
    Architecture.SD2: models_pb.ARCHITECTURE_SD2,
    Architecture.SD3: models_pb.ARCHITECTURE_SD3,
    Architecture.FLUX: models_pb.ARCHITECTURE_FLUX,
    Architecture.UNKNOWN: models_pb.ARCHITECTURE_UNKNOWN,
}

KINDS = {ModelKind.CHECKPOINT: models_pb.MODEL_KIND_CHECKPOINT, ModelKind.LORA: models_pb.MODEL_KIND_LORA}


# ---- GenerationService ------------------------------------------------------------------------------------


def generate_responses(request_id: str, event: domain.JobEvent, chunk_bytes: int) -> Iterator[gen_pb.GenerateResponse]:
    """The stream messages for one event: one, or for a result larger than `chunk_bytes` (settings:
    `image_chunk_bytes`, under gRPC's default 4 MiB receive limit) a run of `image_chunk` messages, the last
    carrying the Image's fields with empty data. Nothing else of the stream comes between them: a request's
    images are emitted after its last step, from one thread."""
    if not isinstance(event, domain.ImageResult) or len(event.data) <= chunk_bytes:
        yield generate_response(request_id, event)
        return
    total = len(event.data)
    for offset in range(0, total, chunk_bytes):
        data = event.data[offset : offset + chunk_bytes]
        last = offset + len(data) == total
        chunk = gen_pb.ImageChunk(index=event.index, offset=offset, total_size=total, data=data)
        if last:
            chunk.image.CopyFrom(_image(dataclasses.replace(event, data=b"")))
        yield gen_pb.GenerateResponse(request_id=request_id, image_chunk=chunk)


def generate_response(request_id: str, event: domain.JobEvent) -> gen_pb.GenerateResponse:
    """The stream message for one event (an image whole, whatever its size)."""
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
        model=event.model.canonical,
        role=_ROLES[event.role],
        phase=_PHASES[event.phase],
        bytes_done=event.bytes_done,
        bytes_total=event.bytes_total,
        bytes_per_second=event.bytes_per_second,
    )


def _progress(event: domain.Progress) -> gen_pb.Progress:
    return gen_pb.Progress(
        stage=_STAGES[event.stage],
        step=event.step,
        stage_steps=event.stage_steps,
        overall_step=event.overall_step,
        total_steps=event.total_steps,
        elapsed=duration(event.elapsed_s),
        image_indices=list(event.image_indices),
        branch=_BRANCHES[event.branch],
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
        branch=_BRANCHES[event.branch],
    )


def _image(event: domain.ImageResult) -> gen_pb.Image:
    image = gen_pb.Image(
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
        branch=_BRANCHES[event.branch],
        loras=[_lora(lora) for lora in event.loras],
        refiner_loras=[_lora(lora) for lora in event.refiner_loras],
        prompt_tokens=[
            gen_pb.PromptTokens(
                stage=_STAGES[t.stage],
                text_encoder=t.encoder,
                positive_tokens=t.positive,
                negative_tokens=t.negative,
                chunks=t.chunks,
            )
            for t in event.tokens
        ],
        mode=_MODES[event.mode],
        first_step=event.first_step,
        reference=event.reference,
    )
    if event.reference:  # not kept: no reference and no expiry
        image.reference_expires.CopyFrom(timestamp(event.reference_expires))
    return image


def timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    """Unix seconds as a protobuf Timestamp, to the microsecond a float of today's date holds (whole nanoseconds
    since 1970 overflow its 53 bits: 0.25 s would read 0.249999872)."""
    seconds = math.floor(unix_s)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=min(round((unix_s - seconds) * 1e6) * 1000, 999_999_999))


def _lora(lora: domain.LoraSpec) -> gen_pb.Lora:
    return gen_pb.Lora(model=lora.model.canonical, weight=lora.weight)


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
        kind=KINDS[model.kind],
        trigger_words=model.trigger_words,
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
            bytes_transferred=max(progress.bytes_transferred, 0),
            model=progress.model,
        )
    )


_VERDICTS = {
    Verdict.INTACT: models_pb.VerifyResult.VERDICT_INTACT,
    Verdict.REPAIRED: models_pb.VerifyResult.VERDICT_REPAIRED,
    Verdict.CORRUPT: models_pb.VerifyResult.VERDICT_CORRUPT,
    Verdict.SKIPPED: models_pb.VerifyResult.VERDICT_SKIPPED,
}


def verify_result(verification: Verification) -> models_pb.VerifyResult:
    return models_pb.VerifyResult(
        model=verification.model,
        verdict=_VERDICTS[verification.verdict],
        bytes_checked=verification.bytes_checked,
        message=verification.message,
    )


# ---- ServerService ----------------------------------------------------------------------------------------


def device_status(device: DeviceSnapshot) -> status_pb.DeviceStatus:
    pairs = []
    for pair in device.pairs:
        last_used = timestamp(pair.last_used_wall)
        pairs.append(
            status_pb.ResidentPair(
                model=pair.key.base.canonical,
                refiner_model=_refiner_text(pair.key),
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
        busy_time=duration(device.busy_s),
    )


def _compiled_shape(shape: ShapeStatus) -> status_pb.CompiledShape:
    return status_pb.CompiledShape(
        model=shape.model,
        role=_ROLES[shape.role],
        width=shape.width,
        height=shape.height,
        max_images=shape.max_images,
        state=_COMPILE_STATES[shape.state],
        pinned=shape.pinned,
        compile_time=duration(shape.seconds),
        error=shape.error,
        text_tokens=shape.tokens,
    )


def pin_failure(failure: PinFailure) -> status_pb.PinFailure:
    """A pinned pair that failed to load, with the status a request for it would have got (the failure was
    logged when it happened)."""
    base, refiner = failure.pair.base.canonical, _refiner_text(failure.pair)
    fields = (ModelField("model", base, Role.BASE), ModelField("refiner_model", refiner, Role.REFINER))
    error = rpc_error_for(failure.error, fields)
    return status_pb.PinFailure(model=base, refiner_model=refiner, error=error.to_status())


def _refiner_text(pair: domain.PairKey) -> str:
    """The pair's refiner as the protos spell it: its canonical AIR, or "" for none."""
    return "" if pair.refiner is None else pair.refiner.canonical


def server_status(status: SchedulerSnapshot, failures: Sequence[PinFailure]) -> status_pb.GetStatusResponse:
    """GetStatus's answer: the devices, the queue, and the start-up pins that failed."""
    queue = status_pb.QueueStatus(
        depth=status.queue_depth, max_queue=status.max_queue, depth_by_priority=status.depth_by_priority
    )
    return status_pb.GetStatusResponse(
        devices=[device_status(d) for d in status.devices],
        queue=queue,
        jobs_running=status.jobs_running,
        pin_failures=[pin_failure(f) for f in failures],
    )
