"""Checks on a freshly loaded SDXL pipeline for what diffusers gets wrong without a word.

Each check is a failure that was seen to pass silently (shared/research/single-file.md):

- P2: a tensor the checkpoint lacks stays on the `meta` device; the CPU then computes with uninitialised
  memory (garbage or NaN images), a GPU move fails much later.
- P8: a config folder without `tokenizer_2/` gives a 2-token tokenizer with no length limit.
- The UNet's input channels: the runner tells an inpainting UNet (9 channels) by `unet.config.in_channels`,
  so a pipeline whose UNet disagrees with the architecture read from the weights must not pass.
- P9: a refiner loaded without `requires_aesthetics_score` builds 6 time ids for a UNet trained on 5 and
  fails at the first generation; the reverse (a base used as refiner with the flag set) fails the same way.

Every failure raises CorruptModel naming the component.
"""

from __future__ import annotations

from typing import Any

from modelstore._architecture import BASE_TIME_IDS, INPAINT_CHANNELS, LATENT_CHANNELS, REFINER_TIME_IDS
from modelstore.errors import CorruptModel
from modelstore.record import Architecture
from modelstore.role import Role

# Both SDXL text encoders read 77 tokens; the UNet was trained on exactly that many hidden states.
SDXL_TOKENS = 77
_TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
_EXAMPLES = 3


def check_pipeline(pipe: Any, *, name: str, role: Role, architecture: Architecture) -> None:
    """Raise CorruptModel unless `pipe` (loaded from `name` for `role`) is complete and consistent."""
    check_no_meta_tensors(pipe, name=name)
    check_tokenizers(pipe, name=name)
    check_time_ids(pipe, name=name, role=role, architecture=architecture)
    check_unet_input(pipe, name=name, architecture=architecture)


def check_no_meta_tensors(pipe: Any, *, name: str) -> None:
    import torch

    for component, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        tensors = [*module.named_parameters(), *module.named_buffers()]
        missing = [key for key, tensor in tensors if tensor.is_meta]
        if missing:
            examples = ", ".join(missing[:_EXAMPLES])
            raise CorruptModel(
                f"{name}: {len(missing)} of {len(tensors)} {component} tensors are missing from the "
                f"checkpoint (e.g. {examples})"
            )


def check_tokenizers(pipe: Any, *, name: str) -> None:
    for tokenizer_name, encoder_name in _TEXT_PAIRS:
        encoder = getattr(pipe, encoder_name, None)
        if encoder is None:
            continue
        tokenizer = getattr(pipe, tokenizer_name, None)
        if tokenizer is None:
            raise CorruptModel(f"{name}: {encoder_name} has no {tokenizer_name}")
        vocab_size = int(encoder.config.vocab_size)
        if len(tokenizer) != vocab_size:
            raise CorruptModel(
                f"{name}: {tokenizer_name} has {len(tokenizer)} tokens but {encoder_name} expects "
                f"{vocab_size} (is the {tokenizer_name} folder missing from its configs?)"
            )
        if tokenizer.model_max_length != SDXL_TOKENS:
            raise CorruptModel(
                f"{name}: {tokenizer_name} truncates at {tokenizer.model_max_length} tokens, not {SDXL_TOKENS}"
            )


def check_time_ids(pipe: Any, *, name: str, role: Role, architecture: Architecture) -> None:
    """The pipeline must build as many time ids as the UNet's text-and-time embedding was trained on."""
    aesthetics = bool(getattr(pipe.config, "requires_aesthetics_score", False))
    if role == Role.REFINER and aesthetics != (architecture is Architecture.SDXL_REFINER):
        raise CorruptModel(f"{name}: requires_aesthetics_score is {aesthetics} but the model is {architecture.label}")
    unet = pipe.unet.config
    built = REFINER_TIME_IDS if aesthetics else BASE_TIME_IDS
    pooled = int(pipe.text_encoder_2.config.projection_dim)
    expected = int(unet.projection_class_embeddings_input_dim)
    got = built * int(unet.addition_time_embed_dim) + pooled
    if got != expected:
        raise CorruptModel(
            f"{name}: the pipeline builds {built} time ids ({got} values) but the UNet expects {expected}"
        )


def check_unet_input(pipe: Any, *, name: str, architecture: Architecture) -> None:
    """The UNet reads as many channels as the weights' architecture says: 9 for an inpainting UNet (the runner
    chooses the inpainting path by this very number), else 4."""
    expected = INPAINT_CHANNELS if architecture is Architecture.SDXL_INPAINT else LATENT_CHANNELS
    got = int(pipe.unet.config.in_channels)
    if got != expected:
        raise CorruptModel(f"{name}: the UNet reads {got} input channels but the model is {architecture.label}")
