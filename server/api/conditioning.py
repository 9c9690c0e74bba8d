"""The request's LoRA lists and prompt lengths, checked at the edge (issue 17): every bad field named before
any work, with the same violation collector as the rest of `validation.py`.

What needs the LoRA's file (a checkpoint named as a LoRA, a LoRA for another architecture or for the other
stage's UNet) is known only once the store has it: the resolver refuses those, still before any step runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from modelstore import AIR, parse_lora_air
from modelstore.errors import InvalidModelId
from refinery.v1 import generation_pb2 as pb
from server.core import domain
from server.core.prompt_tokens import PromptSyntaxError, chunks_for, count_tokens

WEIGHTINGS = {
    pb.PROMPT_WEIGHTING_UNSPECIFIED: domain.PromptWeighting.NONE,
    pb.PROMPT_WEIGHTING_COMPEL: domain.PromptWeighting.COMPEL,
    pb.PROMPT_WEIGHTING_A1111: domain.PromptWeighting.A1111,
}

Report = Callable[..., None]  # validation's `_Violations`: (field, description[, reason])


def model_fields(request: pb.GenerateRequest) -> list[str]:
    """Every field of `request` that names a model, LoRAs included: local paths among them are confined."""
    fields = ["model", "refiner.model"]
    fields += [f"loras[{i}].model" for i in range(len(request.loras))]
    return fields + [f"refiner.loras[{i}].model" for i in range(len(request.refiner.loras))]


def loras(messages: Sequence[pb.Lora], prefix: str, bad: Report) -> tuple[domain.LoraSpec, ...]:
    """One stage's LoRAs in request order; `prefix` is "" for the base and "refiner." for the refiner."""
    if len(messages) > domain.MAX_LORAS:
        bad(f"{prefix}loras", f"at most {domain.MAX_LORAS} LoRAs per stage, got {len(messages)}")
    specs: list[domain.LoraSpec] = []
    seen: dict[AIR, int] = {}
    for i, message in enumerate(messages):
        field = f"{prefix}loras[{i}]"
        weight = float(message.weight) if message.HasField("weight") else 1.0
        low, high = domain.LORA_WEIGHT_RANGE
        if not math.isfinite(weight) or not low <= weight <= high:
            bad(f"{field}.weight", f"must be a finite number in {low:g}..{high:g} (unset: 1), got {weight:g}")
        model = _lora_model(message.model, f"{field}.model", bad)
        if model is None:
            continue
        if model in seen:
            bad(f"{field}.model", f"{model} is already {prefix}loras[{seen[model]}]: give it once, with one weight")
            continue
        seen[model] = i
        specs.append(domain.LoraSpec(model, weight))
    return tuple(specs)


def _lora_model(text: str, field: str, bad: Report) -> AIR | None:
    if not text:
        bad(field, "is required: the LoRA's AIR", "REQUIRED")
        return None
    try:
        return parse_lora_air(text)
    except InvalidModelId as exc:
        bad(field, str(exc), "MALFORMED_AIR")
        return None


def prompts(request: pb.GenerateRequest, max_chars: int, bad: Report) -> tuple[domain.PromptWeighting, int]:
    """The request's prompt weighting and the windows the base's prompts take (a prompt over `max_chars` was
    refused for its length already, and is not read)."""
    weighting = WEIGHTINGS.get(request.prompt_weighting)
    if weighting is None:
        bad("prompt_weighting", f"unknown prompt weighting value {request.prompt_weighting}")
        weighting = domain.PromptWeighting.NONE
    pair = [("positive_prompt", request.positive_prompt), ("negative_prompt", request.negative_prompt)]
    return weighting, chunks([(f, t if len(t) <= max_chars else "") for f, t in pair], weighting, bad)


def chunks(prompts: Sequence[tuple[str, str | None]], how: domain.PromptWeighting, bad: Report) -> int:
    """75-token windows a stage's prompts take: the longest prompt's (the others are padded to it). `prompts`
    are (field, text) pairs; None text: the field is unset. Refuses a prompt beyond `MAX_CHUNKS` windows, or
    with malformed weighting syntax, naming its field."""
    counts: list[int] = []
    for field, text in prompts:
        if not text:
            counts.append(0)
            continue
        try:
            tokens = count_tokens(text, how)
        except PromptSyntaxError as exc:
            bad(field, f"is not valid {how.value} syntax: {exc}")
            counts.append(0)
            continue
        if chunks_for(tokens, 0) > domain.MAX_CHUNKS:
            most = domain.MAX_CHUNKS * domain.CHUNK_TOKENS
            bad(field, f"is {tokens} tokens; at most {most} ({domain.MAX_CHUNKS} windows of {domain.CHUNK_TOKENS})")
            counts.append(0)
            continue
        counts.append(tokens)
    return chunks_for(max(counts, default=0), 0)
