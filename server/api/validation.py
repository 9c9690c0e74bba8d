"""A `GenerateRequest` becomes a validated `Job`, or INVALID_ARGUMENT naming every bad field, before any work.

Validation collects every bad field before refusing and names each by its path in the request
(`refiner.start_step`). Responses go the other way in `convert.py`.
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from modelstore import AIR, parse_air
from modelstore.errors import InvalidModelId
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import status_pb2 as status_pb
from server.api import conditioning, local_models
from server.api.image_fields import DEFAULT_IMAGE_FIELD_LIMITS, ImageFieldLimits, image_fields
from server.core import domain
from server.core.errors import FieldViolation, InvalidRequest, too_much_work
from server.core.settings import Limits
from server.generation import MIN_REFINER_TOTAL_STEPS, base_step_count, min_start_step

MAX_SEED = 2**64 - 1

SAMPLERS = {
    pb.SCHEDULER_UNSPECIFIED: domain.Sampler.EULER,
    pb.SCHEDULER_EULER: domain.Sampler.EULER,
    pb.SCHEDULER_EULER_ANCESTRAL: domain.Sampler.EULER_ANCESTRAL,
    pb.SCHEDULER_DDIM: domain.Sampler.DDIM,
    pb.SCHEDULER_DPMPP_2M: domain.Sampler.DPMPP_2M,
    pb.SCHEDULER_DPMPP_2M_KARRAS: domain.Sampler.DPMPP_2M_KARRAS,
    pb.SCHEDULER_UNIPC: domain.Sampler.UNIPC,
}
FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: domain.ImageFormat.PNG,
    pb.OUTPUT_FORMAT_PNG: domain.ImageFormat.PNG,
    pb.OUTPUT_FORMAT_JPEG: domain.ImageFormat.JPEG,
    pb.OUTPUT_FORMAT_WEBP: domain.ImageFormat.WEBP,
}


def new_request_id() -> str:
    return uuid.uuid4().hex


def random_seed() -> int:
    # 32 bits: easy to read back, type and share, and exact in every client language (JS numbers included).
    return secrets.randbelow(2**32)


class _Violations:
    def __init__(self) -> None:
        self.found: list[FieldViolation] = []

    def __call__(self, field: str, description: str, reason: str = "INVALID_VALUE") -> None:
        self.found.append(FieldViolation(field, description, reason))


def job_from_request(
    request: pb.GenerateRequest,
    *,
    limits: Limits,
    default_model: AIR,
    default_refiner: AIR | None,
    work_limit: float | None = None,
    local_roots: Sequence[Path] = (),
    image_limits: ImageFieldLimits = DEFAULT_IMAGE_FIELD_LIMITS,
    make_request_id: Callable[[], str] = new_request_id,
    make_seed: Callable[[], int] = random_seed,
) -> domain.Job:
    """Validate `request` and turn it into a job; raise InvalidRequest naming every bad field. `work_limit`
    (megapixel-steps) is checked here when the request gives its size; at the model's native size, once the
    model is resolved. Local models are accepted only under `local_roots`; `image_limits` bound the image fields.
    An image is only named here: `seed_inputs.resolve` finds it and checks the size against it."""
    bad = _Violations()
    # A refused local path is one bad field among the others, all named at once.
    bad.found.extend(local_models.refusals(request, conditioning.model_fields(request), local_roots))
    request_id = _request_id(request, limits, make_request_id, bad)
    _check_prompts(request, limits, bad)
    weighting, chunks = conditioning.prompts(request, limits.max_prompt_chars, bad)
    loras = conditioning.loras(request.loras, "", bad)
    model = _model(request.model, "model", bad) if request.model else default_model
    _check_size(request, limits, bad)
    steps, cfg_scale, number_results, seed = _numbers(request, limits, make_seed, bad)
    sampler, output_format = _check_enums(request, bad)
    _check_stream_and_priority(request, limits, bad)
    image = image_fields(request, steps, image_limits, bad)
    refiner, base_steps = None, steps
    if request.HasField("refiner"):
        refiner, base_steps = _refiner(request, steps, default_refiner, limits, weighting, image.from_image, bad)
    if bad.found:
        raise InvalidRequest(bad.found)
    assert model is not None and sampler is not None and output_format is not None
    job = domain.Job(
        request_id=request_id,
        model=model,
        refiner=refiner,
        prompt=request.positive_prompt,
        negative_prompt=request.negative_prompt or None,
        width=request.width,
        height=request.height,
        steps=steps,
        base_steps=base_steps,
        cfg_scale=cfg_scale,
        seed=seed,
        sampler=sampler,
        number_results=number_results,
        output_format=output_format,
        preview_every=request.preview_every,
        priority=request.priority,
        loras=loras,
        prompt_weighting=weighting,
        chunks=chunks,
        start_index=image.start_index,
        keep_results_s=image.keep_results_s,
    )
    check_work(job, work_limit)
    return job


def check_work(job: domain.Job, work_limit: float | None) -> None:
    """Refuse `job` when it asks for more than `work_limit` megapixel-steps. Known once the request is whole
    (compare runs more steps) and its size is known: at the native size, once the model is; for an image, once
    `seed_inputs.resolve` has read its size."""
    if work_limit is not None and job.width and job.height and job.work(job.width, job.height) > work_limit:
        raise too_much_work(job.work(job.width, job.height), work_limit)


def _request_id(request: pb.GenerateRequest, limits: Limits, make: Callable[[], str], bad: _Violations) -> str:
    request_id = request.request_id or make()
    if len(request_id) > limits.max_request_id_chars or not request_id.isprintable():
        bad("request_id", f"must be at most {limits.max_request_id_chars} printable characters")
    return request_id


def _check_stream_and_priority(request: pb.GenerateRequest, limits: Limits, bad: _Violations) -> None:
    if request.preview_every > limits.max_steps:
        bad("preview_every", f"must be 0 (no previews) or 1..{limits.max_steps}")
    if abs(request.priority) > limits.max_priority:
        bad("priority", f"must be in -{limits.max_priority}..{limits.max_priority}")


def _check_prompts(request: pb.GenerateRequest, limits: Limits, bad: _Violations) -> None:
    prompt = request.positive_prompt
    if not visible(prompt).strip():
        bad("positive_prompt", "is required and must not be blank", "REQUIRED")
    elif len(prompt) > limits.max_prompt_chars:
        bad("positive_prompt", f"must be at most {limits.max_prompt_chars} characters")
    if len(request.negative_prompt) > limits.max_prompt_chars:
        bad("negative_prompt", f"must be at most {limits.max_prompt_chars} characters")


def _numbers(
    request: pb.GenerateRequest, limits: Limits, make_seed: Callable[[], int], bad: _Violations
) -> tuple[int, float, int, int]:
    """steps, cfg_scale, number_results and seed, defaults applied."""
    steps = request.steps or limits.default_steps
    if steps > limits.max_steps:
        bad("steps", f"must be 0 (= {limits.default_steps}) or 1..{limits.max_steps}, got {steps}")
    cfg_scale = float(request.cfg_scale) if request.cfg_scale else limits.default_cfg_scale
    if not math.isfinite(cfg_scale) or not 0 < cfg_scale <= limits.max_cfg_scale:
        bad("cfg_scale", f"must be 0 (= {limits.default_cfg_scale}) or in (0, {limits.max_cfg_scale}]")
    number_results = request.number_results or 1
    if number_results > limits.max_results:
        bad("number_results", f"must be 0 (= 1) or 1..{limits.max_results}, got {number_results}")
    seed = request.seed if request.HasField("seed") else make_seed()
    if seed + number_results - 1 > MAX_SEED:
        bad("seed", f"seed + number_results - 1 must not exceed {MAX_SEED}")
    return steps, cfg_scale, number_results, seed


def visible(text: str) -> str:
    """`text` without control characters (NUL, escapes, ...), which no tokenizer turns into meaning."""
    return "".join(ch for ch in text if ch.isprintable() or ch.isspace())


def _check_size(request: pb.GenerateRequest, limits: Limits, bad: _Violations) -> None:
    for name in ("width", "height"):
        value = getattr(request, name)
        if value and (value % 8 or not limits.min_side <= value <= limits.max_side):
            bad(
                name,
                f"must be 0 (the model's native size) or a multiple of 8 in "
                f"{limits.min_side}..{limits.max_side}, got {value}",
            )


def _check_enums(
    request: pb.GenerateRequest, bad: _Violations
) -> tuple[domain.Sampler | None, domain.ImageFormat | None]:
    sampler = SAMPLERS.get(request.scheduler)
    if sampler is None:
        bad("scheduler", f"unknown scheduler value {request.scheduler}")
    output_format = FORMATS.get(request.output_format)
    if output_format is None:
        bad("output_format", f"unknown output format value {request.output_format}")
    return sampler, output_format


def _model(text: str, field: str, bad: _Violations) -> AIR | None:
    """The AIR `text` names: parsed here, once; everything past the edge carries this value."""
    try:
        return parse_air(text)
    except InvalidModelId as exc:
        bad(field, str(exc), "MALFORMED_AIR")
        return None


def _refiner(
    request: pb.GenerateRequest,
    steps: int,
    default_refiner: AIR | None,
    limits: Limits,
    weighting: domain.PromptWeighting,
    from_image: bool,
    bad: _Violations,
) -> tuple[domain.RefinerSpec | None, int]:
    message = request.refiner
    model: AIR | None
    if message.model:
        model = _model(message.model, "refiner.model", bad)
    elif default_refiner is not None:
        model = default_refiner
    else:
        bad("refiner.model", "is required (this server has no default refiner)", "REQUIRED")
        if message.compare:
            bad("refiner.compare", "needs a refiner to compare with: set refiner.model (this server has no default)")
        model = None
    start: domain.RefinerStart = domain.DEFAULT_REFINER_START
    which = message.WhichOneof("start")
    if which == "start_step":
        first = min_start_step(from_image)  # 1 with an image: refine-only
        if not first <= message.start_step <= steps:
            where = "with an image" if from_image else "without an image"
            bad("refiner.start_step", f"must be in {first}..steps ({first}..{steps} {where}), got {message.start_step}")
        start = domain.StartStep(message.start_step)
    elif which == "start_step_percentage":
        if not 1 <= message.start_step_percentage <= 99:
            bad("refiner.start_step_percentage", f"must be in 1..99, got {message.start_step_percentage}")
        start = domain.StartPercentage(message.start_step_percentage)
    if steps < MIN_REFINER_TOTAL_STEPS:
        bad("steps", f"a refiner needs at least {MIN_REFINER_TOTAL_STEPS} steps, got {steps}")
    scores, prompt = _refiner_conditioning(request, limits, bad)
    loras = conditioning.loras(message.loras, "refiner.", bad)
    chunks = _refiner_chunks(request, prompt, weighting, limits.max_prompt_chars, bad)
    if model is None:
        return None, steps
    try:
        base_steps = base_step_count(steps, start, from_image=from_image)
    except ValueError:
        return None, steps  # already reported above
    return domain.RefinerSpec(model, start, message.compare, scores, prompt, loras, chunks), base_steps


def _refiner_chunks(
    request: pb.GenerateRequest,
    prompt: domain.Prompt | None,
    weighting: domain.PromptWeighting,
    max_chars: int,
    bad: _Violations,
) -> int:
    """The refiner's windows, for the prompts it actually reads. Only its own prompts are reported here: the
    request's, where it inherits them, were reported under their own fields already."""
    message = request.refiner
    own = {f"refiner.{name}" for name in ("positive_prompt", "negative_prompt") if message.HasField(name)}

    def report(field: str, *details: str) -> None:
        if field in own:
            bad(field, *details)

    effective = prompt or domain.Prompt(request.positive_prompt, request.negative_prompt or None)
    stage_prompts = [("refiner.positive_prompt", effective.positive), ("refiner.negative_prompt", effective.negative)]
    readable = [(f, t if t is None or len(t) <= max_chars else "") for f, t in stage_prompts]  # too long: refused
    return conditioning.chunks(readable, weighting, report)


def _refiner_conditioning(
    request: pb.GenerateRequest, limits: Limits, bad: _Violations
) -> tuple[domain.AestheticScores, domain.Prompt | None]:
    """The refiner's aesthetic scores and own prompts (issue 11); unset fields take the defaults."""
    message = request.refiner
    defaults = domain.AestheticScores()
    scores = domain.AestheticScores(
        _score(message, "aesthetic_score", defaults.positive, bad),
        _score(message, "negative_aesthetic_score", defaults.negative, bad),
    )
    own_positive, own_negative = message.HasField("positive_prompt"), message.HasField("negative_prompt")
    if own_positive and not visible(message.positive_prompt).strip():
        bad("refiner.positive_prompt", "must not be blank (unset: the request's positive_prompt)", "REQUIRED")
    elif own_positive and len(message.positive_prompt) > limits.max_prompt_chars:
        bad("refiner.positive_prompt", f"must be at most {limits.max_prompt_chars} characters")
    if own_negative and len(message.negative_prompt) > limits.max_prompt_chars:
        bad("refiner.negative_prompt", f"must be at most {limits.max_prompt_chars} characters")
    if not (own_positive or own_negative):
        return scores, None
    positive = message.positive_prompt if own_positive else request.positive_prompt
    negative = message.negative_prompt if own_negative else request.negative_prompt
    return scores, domain.Prompt(positive, negative or None)  # empty: no negative prompt, as on the base


def _score(message: pb.Refiner, name: str, default: float, bad: _Violations) -> float:
    if not message.HasField(name):
        return default
    value = float(getattr(message, name))
    low, high = domain.AESTHETIC_SCORE_RANGE
    if not math.isfinite(value) or not low <= value <= high:
        bad(f"refiner.{name}", f"must be a finite number in {low:g}..{high:g} (unset: {default:g}), got {value:g}")
    return value


def pair_from_request(request: status_pb.PinPairRequest | status_pb.UnpinPairRequest) -> domain.PairKey:
    """The pair PinPair or UnpinPair names, its AIRs parsed here (a malformed AIR raises InvalidModelId, which the
    boundary names by its field)."""
    if not request.model:
        raise InvalidRequest([FieldViolation("model", "required: the base's AIR")])
    return domain.PairKey(parse_air(request.model), parse_air(request.refiner_model) if request.refiner_model else None)
