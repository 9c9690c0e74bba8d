"""The one module that sees protobuf: requests become validated `GenerationJob`s, events become responses.

Validation collects every bad field before refusing, names each by its path in the request
(`refiner.start_step`), and runs before any work starts.
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Callable

from google.protobuf import duration_pb2

from modelstore import parse_air
from modelstore.errors import InvalidModelId
from refinery.v1 import generation_pb2 as pb
from server import job as domain
from server.errors import FieldViolation, InvalidRequest
from server.settings import Limits
from server.split import MIN_REFINER_TOTAL_STEPS, base_step_count

MAX_SEED = 2**64 - 1

_SCHEDULERS = {
    pb.SCHEDULER_UNSPECIFIED: domain.SchedulerKind.EULER,
    pb.SCHEDULER_EULER: domain.SchedulerKind.EULER,
    pb.SCHEDULER_EULER_ANCESTRAL: domain.SchedulerKind.EULER_ANCESTRAL,
    pb.SCHEDULER_DDIM: domain.SchedulerKind.DDIM,
    pb.SCHEDULER_DPMPP_2M: domain.SchedulerKind.DPMPP_2M,
    pb.SCHEDULER_DPMPP_2M_KARRAS: domain.SchedulerKind.DPMPP_2M_KARRAS,
    pb.SCHEDULER_UNIPC: domain.SchedulerKind.UNIPC,
}
_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: domain.ImageFormat.PNG,
    pb.OUTPUT_FORMAT_PNG: domain.ImageFormat.PNG,
    pb.OUTPUT_FORMAT_JPEG: domain.ImageFormat.JPEG,
    pb.OUTPUT_FORMAT_WEBP: domain.ImageFormat.WEBP,
}
_STAGES = {domain.Stage.BASE: pb.STAGE_BASE, domain.Stage.REFINER: pb.STAGE_REFINER}
_ROLES = {domain.ModelRole.BASE: pb.MODEL_ROLE_BASE, domain.ModelRole.REFINER: pb.MODEL_ROLE_REFINER}
_PHASES = {
    domain.LoadPhase.DOWNLOADING: pb.ModelLoading.PHASE_DOWNLOADING,
    domain.LoadPhase.VERIFYING: pb.ModelLoading.PHASE_VERIFYING,
    domain.LoadPhase.LOADING: pb.ModelLoading.PHASE_LOADING,
    domain.LoadPhase.READY: pb.ModelLoading.PHASE_READY,
}


def new_request_id() -> str:
    return uuid.uuid4().hex


def random_seed() -> int:
    # 32 bits: easy to read back, type and share, and exact in every client language (JS numbers included).
    return secrets.randbelow(2**32)


def job_from_request(
    request: pb.GenerateRequest,
    *,
    limits: Limits,
    default_model: str,
    default_refiner: str | None,
    make_request_id: Callable[[], str] = new_request_id,
    make_seed: Callable[[], int] = random_seed,
) -> domain.GenerationJob:
    """Validate `request` and turn it into a job; raise InvalidRequest naming every bad field."""
    bad: list[FieldViolation] = []

    def violation(field: str, description: str, reason: str = "INVALID_VALUE") -> None:
        bad.append(FieldViolation(field, description, reason))

    request_id = request.request_id or make_request_id()
    if len(request_id) > limits.max_request_id_chars or not request_id.isprintable():
        violation("request_id", f"must be at most {limits.max_request_id_chars} printable characters")

    prompt = request.positive_prompt
    if not prompt.strip():
        violation("positive_prompt", "is required and must not be blank", "REQUIRED")
    elif len(prompt) > limits.max_prompt_chars:
        violation("positive_prompt", f"must be at most {limits.max_prompt_chars} characters")
    negative = request.negative_prompt
    if len(negative) > limits.max_prompt_chars:
        violation("negative_prompt", f"must be at most {limits.max_prompt_chars} characters")

    model = _model(request.model or default_model, "model", violation)

    for name in ("width", "height"):
        value = getattr(request, name)
        if value and (value % 8 or not limits.min_side <= value <= limits.max_side):
            violation(
                name,
                f"must be 0 (the model's native size) or a multiple of 8 in "
                f"{limits.min_side}..{limits.max_side}, got {value}",
            )

    steps = request.steps or limits.default_steps
    if steps > limits.max_steps:
        violation("steps", f"must be 0 (= {limits.default_steps}) or 1..{limits.max_steps}, got {steps}")

    cfg_scale = float(request.cfg_scale) if request.cfg_scale else limits.default_cfg_scale
    if not math.isfinite(cfg_scale) or not 0 < cfg_scale <= limits.max_cfg_scale:
        violation("cfg_scale", f"must be 0 (= {limits.default_cfg_scale}) or in (0, {limits.max_cfg_scale}]")

    number_results = request.number_results or 1
    if number_results > limits.max_results:
        violation("number_results", f"must be 0 (= 1) or 1..{limits.max_results}, got {number_results}")

    seed = request.seed if request.HasField("seed") else make_seed()
    if seed + number_results - 1 > MAX_SEED:
        violation("seed", f"seed + number_results - 1 must not exceed {MAX_SEED}")

    scheduler = _SCHEDULERS.get(request.scheduler)
    if scheduler is None:
        violation("scheduler", f"unknown scheduler value {request.scheduler}")
    output_format = _FORMATS.get(request.output_format)
    if output_format is None:
        violation("output_format", f"unknown output format value {request.output_format}")

    if request.preview_every > limits.max_steps:
        violation("preview_every", f"must be 0 (no previews) or 1..{limits.max_steps}")

    if abs(request.priority) > limits.max_priority:
        violation("priority", f"must be in -{limits.max_priority}..{limits.max_priority}")

    refiner: domain.RefinerSpec | None = None
    base_steps = steps
    if request.HasField("refiner"):
        refiner, base_steps = _refiner(request.refiner, steps, default_refiner, violation)

    if bad:
        raise InvalidRequest(bad)
    assert model is not None and scheduler is not None and output_format is not None
    return domain.GenerationJob(
        request_id=request_id,
        model=model,
        refiner=refiner,
        prompt=prompt,
        negative_prompt=negative or None,
        width=request.width,
        height=request.height,
        steps=steps,
        base_steps=base_steps,
        cfg_scale=cfg_scale,
        seed=seed,
        scheduler=scheduler,
        number_results=number_results,
        output_format=output_format,
        preview_every=request.preview_every,
        priority=request.priority,
    )


def _model(text: str, field: str, violation: Callable[..., None]) -> str | None:
    try:
        return parse_air(text).canonical
    except InvalidModelId as exc:
        violation(field, str(exc), "MALFORMED_AIR")
        return None


def _refiner(
    message: pb.Refiner, steps: int, default_refiner: str | None, violation: Callable[..., None]
) -> tuple[domain.RefinerSpec | None, int]:
    model: str | None
    if message.model:
        model = _model(message.model, "refiner.model", violation)
    elif default_refiner is not None:
        model = default_refiner
    else:
        violation("refiner.model", "is required (this server has no default refiner)", "REQUIRED")
        model = None
    start: domain.RefinerStart = domain.DEFAULT_REFINER_START
    which = message.WhichOneof("start")
    if which == "start_step":
        if not 2 <= message.start_step <= steps:
            violation("refiner.start_step", f"must be in 2..steps (2..{steps}), got {message.start_step}")
        start = domain.StartStep(message.start_step)
    elif which == "start_step_percentage":
        if not 1 <= message.start_step_percentage <= 99:
            violation("refiner.start_step_percentage", f"must be in 1..99, got {message.start_step_percentage}")
        start = domain.StartPercentage(message.start_step_percentage)
    if steps < MIN_REFINER_TOTAL_STEPS:
        violation("steps", f"a refiner needs at least {MIN_REFINER_TOTAL_STEPS} steps, got {steps}")
    if model is None:
        return None, steps
    try:
        base_steps = base_step_count(steps, start)
    except ValueError:
        return None, steps  # already reported above
    return domain.RefinerSpec(model, start), base_steps


def response_for(request_id: str, event: domain.JobEvent) -> pb.GenerateResponse:
    """The stream message for one event."""
    if isinstance(event, domain.Queued):
        return pb.GenerateResponse(
            request_id=request_id, queued=pb.Queued(position=event.position, queue_depth=event.queue_depth)
        )
    if isinstance(event, domain.ModelLoading):
        return pb.GenerateResponse(
            request_id=request_id,
            model_loading=pb.ModelLoading(
                model=event.model,
                role=_ROLES[event.role],
                phase=_PHASES[event.phase],
                bytes_done=event.bytes_done,
                bytes_total=event.bytes_total,
                bytes_per_second=event.bytes_per_second,
            ),
        )
    if isinstance(event, domain.Progress):
        elapsed = duration_pb2.Duration()
        elapsed.FromNanoseconds(int(event.elapsed_s * 1e9))
        return pb.GenerateResponse(
            request_id=request_id,
            progress=pb.Progress(
                stage=_STAGES[event.stage],
                step=event.step,
                stage_steps=event.stage_steps,
                overall_step=event.overall_step,
                total_steps=event.total_steps,
                elapsed=elapsed,
                image_indices=list(event.image_indices),
            ),
        )
    if isinstance(event, domain.Preview):
        return pb.GenerateResponse(
            request_id=request_id,
            preview=pb.Preview(
                stage=_STAGES[event.stage],
                step=event.step,
                overall_step=event.overall_step,
                image_index=event.image_index,
                data=event.data,
                mime_type=event.mime_type,
                width=event.width,
                height=event.height,
            ),
        )
    return pb.GenerateResponse(
        request_id=request_id,
        image=pb.Image(
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
        ),
    )
