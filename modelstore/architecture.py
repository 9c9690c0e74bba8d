"""Which model family a set of weights belongs to, read from the weights' own structure.

A diffusers folder is read from its UNet config: SDXL's UNets condition on text-and-time embeddings whose
input width is `time_ids * addition_time_embed_dim + pooled_projection_dim`, with 6 time ids for the base and
5 (aesthetic score instead of target size) for the refiner (shared/research/diffusers.md §2).
"""

from __future__ import annotations

import json
from pathlib import Path

from modelstore.errors import ModelNotFound
from modelstore.record import Architecture


def detect_folder(folder: Path) -> Architecture:
    """The architecture of a diffusers-format folder."""
    unet_config = folder / "unet" / "config.json"
    if not (folder / "model_index.json").is_file() or not unet_config.is_file():
        raise ModelNotFound(f"{folder} is not a diffusers model folder (no model_index.json or unet/config.json)")
    unet = json.loads(unet_config.read_text())
    if "transformer" in json.loads((folder / "model_index.json").read_text()):
        return Architecture.SD3  # SD3 / FLUX folders have a transformer, not a UNet; refined below if ever needed
    if unet.get("addition_embed_type") != "text_time":
        cross = unet.get("cross_attention_dim")
        return {768: Architecture.SD1, 1024: Architecture.SD2}.get(cross, Architecture.UNKNOWN)
    te2_config = folder / "text_encoder_2" / "config.json"
    if not te2_config.is_file():
        return Architecture.UNKNOWN
    pooled = int(json.loads(te2_config.read_text())["projection_dim"])
    time_dim = int(unet["addition_time_embed_dim"])
    time_ids, remainder = divmod(int(unet["projection_class_embeddings_input_dim"]) - pooled, time_dim)
    if remainder:
        return Architecture.UNKNOWN
    return {6: Architecture.SDXL_BASE, 5: Architecture.SDXL_REFINER}.get(time_ids, Architecture.UNKNOWN)
