"""Full-size SDXL base and refiner folders with random weights, built from the configs the package ships.

Timing does not depend on the weights' values, so a GPU benchmark can measure the real architectures without
downloading 13 GB: the modules are initialised directly on the device (seconds on a GPU), cast to fp16 and
written as a diffusers-format folder of safetensors. The refiner gets the base's VAE and OpenCLIP encoder
files (hard links), exactly as the official pair shares them. Random fp16 weights may produce NaN images,
which costs the same time as real ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CONFIGS = Path(__file__).resolve().parent.parent / "modelstore" / "configs"


def _save(module: Any, folder: Path, filename: str, config_writer: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config_writer(folder)
    tensors = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(folder / filename), metadata={"format": "pt"})


def write_random_sdxl(dest: Path, *, refiner: bool, seed: int, device: str, share_from: Path | None = None) -> Path:
    """Write a random-weight SDXL base (or refiner) folder at `dest` and return it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    reference = CONFIGS / ("sdxl_refiner" if refiner else "sdxl_base")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy(reference / "model_index.json", staging / "model_index.json")
    for name in ("scheduler", "tokenizer", "tokenizer_2"):
        if (reference / name).is_dir():
            shutil.copytree(reference / name, staging / name)

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(json.loads((reference / "unet" / "config.json").read_text()))
    _save(unet, staging / "unet", "diffusion_pytorch_model.safetensors", unet.save_config)
    del unet

    if share_from is not None:
        # Everything but the UNet comes from `share_from`: a refiner shares the VAE and OpenCLIP encoder with
        # its base; a second base (another "fine-tune") shares its text encoders and VAE too.
        shared = ["vae", "text_encoder_2"] + ([] if refiner else ["text_encoder"])
        for name in shared:
            (staging / name).mkdir()
            for file in (share_from / name).iterdir():
                os.link(file, staging / name / file.name)
    else:
        with torch.device(device):
            vae = AutoencoderKL.from_config(json.loads((reference / "vae" / "config.json").read_text()))
        _save(vae, staging / "vae", "diffusion_pytorch_model.safetensors", vae.save_config)
        del vae
        te2_config = CLIPTextConfig.from_json_file(str(reference / "text_encoder_2" / "config.json"))
        with torch.device(device):
            te2 = CLIPTextModelWithProjection(te2_config)
        _save(te2, staging / "text_encoder_2", "model.safetensors", te2.config.save_pretrained)
        del te2
    if not refiner and share_from is None:
        te1_config = CLIPTextConfig.from_json_file(str(reference / "text_encoder" / "config.json"))
        with torch.device(device):
            te1 = CLIPTextModel(te1_config)
        _save(te1, staging / "text_encoder", "model.safetensors", te1.config.save_pretrained)
        del te1
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    return dest
