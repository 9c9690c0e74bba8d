"""The speed options: what "auto" means where, what a device cannot do is refused in one line, and each option
changes the loaded modules as it says while the images stay those of the untuned path up to rounding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from modelstore import ModelStore, Role, load_pipeline
from server.core.settings import Speed, Toggle
from server.generation.tuning import Tuning, tune_pipeline, tuning_for
from tests.conftest import TINY_BASE


def test_auto_is_untuned_on_the_cpu_and_compile_off_is_untuned_everywhere() -> None:
    assert tuning_for(Speed(), "cpu").untuned
    assert tuning_for(Speed(compile="off"), "cpu").untuned
    # Explicit choices hold on the CPU too (that is how the tests reach every code path); "auto" stays off.
    chosen = tuning_for(Speed(compile="default", fuse_qkv=Toggle.ON, vae_decode="bfloat16"), "cpu")
    assert chosen == Tuning("default", fuse_qkv=True, channels_last=False, vae_bfloat16=True)
    assert chosen.describe() == "compile default, fused QKV, bfloat16 VAE decode"


def test_fp8_is_refused_in_one_line_where_the_device_has_none() -> None:
    with pytest.raises(
        ValueError, match=r"^--fp8 needs a CUDA GPU with FP8 \(compute capability 8\.9\+\); cpu has none$"
    ):
        tuning_for(Speed(fp8=True), "cpu")


@pytest.fixture
def base_pipeline(model_store: ModelStore) -> Any:
    return load_pipeline(model_store.resolve(TINY_BASE), role=Role.BASE, device="cpu")


def _generate(pipe: Any) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    image = pipe(prompt="a red bicycle", num_inference_steps=3, generator=generator, output_type="np").images[0]
    return np.asarray(image) * 255.0


def test_fused_qkv_and_channels_last_change_the_unet_not_the_image(base_pipeline: Any, model_store: ModelStore) -> None:
    untuned = _generate(base_pipeline)
    unet = base_pipeline.unet
    weights = sum(p.numel() for p in unet.parameters())
    tune_pipeline(
        base_pipeline, Tuning(None, fuse_qkv=True, channels_last=True), compiler=None, model="m", role=Role.BASE
    )
    assert sum(p.numel() for p in unet.parameters()) == weights  # fused, not held twice
    attention = next(m for m in unet.modules() if type(m).__name__ == "Attention")
    assert attention.fused_projections
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(_generate(base_pipeline) - untuned).max() < 0.5  # the same image, up to float rounding


def test_the_vae_decodes_in_bfloat16_close_to_float32(base_pipeline: Any) -> None:
    upcast = _generate(base_pipeline)
    tune_pipeline(base_pipeline, Tuning(None, vae_bfloat16=True), compiler=None, model="m", role=Role.BASE)
    assert base_pipeline.vae.dtype == torch.bfloat16 and base_pipeline.unet.dtype == torch.float32
    decoded = _generate(base_pipeline)  # fp32 latents into the bfloat16 VAE: the hook casts them
    difference = np.abs(decoded - upcast)
    assert 0 < difference.max() <= 8  # bfloat16's rounding, not another picture
    assert difference.mean() < 1
