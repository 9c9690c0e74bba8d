"""Whether a safetensors file is a LoRA, and which model it was trained on, from its header alone.

A LoRA stores, per adapted layer, a "down" matrix [rank, in] and an "up" matrix [out, rank]. The common key
layouts (shared/research/modelstore.md; diffusers' `lora_conversion_utils` converts between them):

- kohya / A1111: `lora_unet_<module path, dots as underscores>.lora_down.weight`, `.lora_up.weight` and a
  scalar `.alpha`; text encoders under `lora_te_` (SD 1.x / 2.x's one) or `lora_te1_` / `lora_te2_` (SDXL's
  CLIP-L and OpenCLIP bigG);
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.` and `text_encoder_2.`;
  older diffusers files say `.lora.down.weight` / `.lora.up.weight` (or `processor.to_k_lora.down.weight`);
- FLUX (and SD3): `transformer.` (diffusers), `lora_transformer_` or `..._double_blocks_` (kohya).

What a LoRA fits is read from the cross-attention context its UNet part expects: the input width of an `attn2`
to_k / to_v down matrix is the width of the text hidden states that UNet attends to, which differs for every
family (SDXL base: CLIP-L + bigG = 2048; refiner: bigG alone = 1280; SD 1.x: 768; SD 2.x: 1024) and for the
built-in tiny models (their own encoder widths, `_model_dims`). A LoRA with no UNet cross-attention part is
judged by its text encoders: two are SDXL base's, one is SD 1.x's or 2.x's by its width. Names are never
trusted, and no tensor is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from modelstore._model_dims import TINY_BIGG_WIDTH, TINY_CLIP_L_WIDTH
from modelstore._safetensors_header import TensorInfo
from modelstore.record import Architecture

_DOWN = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight")
_UP = (".lora_up.weight", ".lora_B.weight", ".lora.up.weight", "_lora.up.weight")

# Cross-attention context width -> the UNet that reads it.
_CONTEXT_WIDTHS = {
    2048: Architecture.SDXL_BASE,
    1280: Architecture.SDXL_REFINER,
    768: Architecture.SD1,
    1024: Architecture.SD2,
    TINY_CLIP_L_WIDTH + TINY_BIGG_WIDTH: Architecture.SDXL_BASE,
    TINY_BIGG_WIDTH: Architecture.SDXL_REFINER,
}
# A lone text encoder's width: CLIP-L (SD 1.x) or OpenCLIP ViT-H (SD 2.x).
_SINGLE_ENCODER_WIDTHS = {768: Architecture.SD1, 1024: Architecture.SD2}

# Keys are compared with dots made underscores, so the kohya and diffusers spellings read alike.
_CROSS_ATTENTION_KV = re.compile(r"attn2_(?:processor_)?to_[kv]_")
_FLUX_MARKERS = ("double_blocks", "single_blocks", "single_transformer_blocks")
_TEXT_ENCODERS = (
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),  # diffusers: SDXL's CLIP-L, or SD 1.x / 2.x's only encoder
)


def is_lora(tensors: Mapping[str, TensorInfo]) -> bool:
    """Whether any key is a LoRA down or up matrix, in any of the layouts above."""
    return any(key.endswith(_DOWN) or key.endswith(_UP) for key in tensors)


def lora_architecture(tensors: Mapping[str, TensorInfo]) -> Architecture | None:
    """The architecture a LoRA was trained on, or None when `tensors` are not a LoRA at all."""
    if not is_lora(tensors):
        return None
    parts = _Parts.of(tensors)
    if parts.transformer is not None:
        return parts.transformer
    if parts.contexts:
        return _from_context(parts)
    encoders = parts.encoders
    if "te2" in encoders:
        # With CLIP-L beside it (diffusers spells it `text_encoder.`): SDXL base's pair of encoders.
        return Architecture.SDXL_BASE if encoders.keys() & {"te1", "te"} else Architecture.UNKNOWN
    lone = encoders.get("te1") or encoders.get("te") or set()
    if len(lone) == 1:
        return _SINGLE_ENCODER_WIDTHS.get(next(iter(lone)), Architecture.UNKNOWN)
    return Architecture.UNKNOWN  # bigG alone fits either SDXL model; anything else is not a family we know


@dataclass
class _Parts:
    """What a LoRA's keys say: a transformer family, the UNet's cross-attention widths, and per text encoder
    ("te1", "te2", or "te" for an encoder the prefix leaves open) its input widths."""

    transformer: Architecture | None = None
    contexts: set[int] = field(default_factory=set)
    encoders: dict[str, set[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, tensors: Mapping[str, TensorInfo]) -> _Parts:
        parts = cls()
        for key, info in tensors.items():
            family = _transformer_family(key)
            if family is not None:
                parts.transformer = family if parts.transformer in (None, family) else Architecture.UNKNOWN
                continue
            if not key.endswith(_DOWN) or len(info.shape) < 2:
                continue
            encoder = next((name for prefix, name in _TEXT_ENCODERS if key.startswith(prefix)), None)
            if encoder is not None:
                parts.encoders.setdefault(encoder, set()).add(info.shape[1])
            elif _CROSS_ATTENTION_KV.search(key.replace(".", "_")):
                parts.contexts.add(info.shape[1])
        return parts


def _transformer_family(key: str) -> Architecture | None:
    if "joint_blocks" in key:
        return Architecture.SD3
    if key.startswith(("transformer.", "lora_transformer_")) or any(m in key for m in _FLUX_MARKERS):
        return Architecture.FLUX
    return None


def _from_context(parts: _Parts) -> Architecture:
    if len(parts.contexts) != 1:
        return Architecture.UNKNOWN  # one UNet reads one context; several widths are no model we know
    architecture = _CONTEXT_WIDTHS.get(next(iter(parts.contexts)), Architecture.UNKNOWN)
    # A part for a text encoder the UNet's model does not have contradicts it: trust neither.
    if architecture is Architecture.SDXL_REFINER and parts.encoders.keys() & {"te1", "te"}:
        return Architecture.UNKNOWN
    if architecture in (Architecture.SD1, Architecture.SD2) and parts.encoders.keys() & {"te1", "te2"}:
        return Architecture.UNKNOWN
    return architecture
