"""Test helper: full-size SDXL diffusers folders as the Hub has them, real configs with header-only weights
(tests/fixtures/headers.py), for detection tests that need the real shapes without gigabytes of data."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.fixtures.headers import write_header_only


def real_diffusers_folder(config: Path, dest: Path) -> Path:
    """A full-size SDXL diffusers folder as the Hub has it: real configs, header-only weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shutil.copytree(config, dest)
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2")),
        }
        if (config / "text_encoder").is_dir():
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    for name, module in modules.items():
        shapes = {key: tuple(t.shape) for key, t in module.state_dict().items()}
        if name == "text_encoder":  # the Hub's files predate transformers 5.6's flat CLIPTextModel keys
            shapes = {f"text_model.{key}": shape for key, shape in shapes.items()}
        filename = "model.safetensors" if name.startswith("text") else "diffusion_pytorch_model.safetensors"
        write_header_only(dest / name / filename, shapes)
    return dest
