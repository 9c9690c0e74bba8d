"""Which model family a set of weights belongs to, read from the weights' own safetensors headers.

Names, config class names and file names are never trusted: a single file is judged by its key names and
shapes, a diffusers folder by the headers of its UNet (or transformer) and text encoders. Configs are read
only for what a header cannot tell (the width of one time id). No tensor data is read.

SDXL is recognised by its text-and-time ("adm") embedding, `label_emb.0.0.weight` of shape
[time-embedding width, pooled width + time ids x time-id width] (shared/research/diffusers.md §2):

- base: CLIP-L then OpenCLIP bigG (`conditioner.embedders.0.transformer` + `conditioner.embedders.1.model`),
  6 time ids (original size, crop, target size); real: [1280, 2816] = 1280 + 6 x 256;
- refiner: bigG alone (`conditioner.embedders.0.model`), 5 time ids (the aesthetic score replaces the target
  size); real: [1536, 2560] = 1280 + 5 x 256.

The pooled width is bigG's `text_projection`, the number of time ids follows from the text-encoder layout,
and the cross-attention context must be the concatenated encoder widths. So the tiny built-in models (CLIP-L
32 + bigG 40, projection 24, time ids of width 8: 72 = 24 + 6 x 8 and 64 = 24 + 5 x 8) are recognised by the
same rules as the real ones, not by a table of real sizes. A UNet-only file (no text encoders,
single-file.md P11) is only recognised by the real SDXL shapes.

The UNet's input convolution tells what it denoises from: 4 channels (the latent) for text-to-image, 9 for an
inpainting UNet (latent + mask + the masked image's latent, e.g. diffusers/stable-diffusion-xl-1.0-inpainting-
0.1). A 9-channel UNet with everything else of a base is SDXL_INPAINT; any other channel count is UNKNOWN.

Other families are named as far as the header allows: SD 1.x and 2.x by their cross-attention context (768,
1024) and the absence of the adm embedding, SD3 by its MMDiT `joint_blocks`, FLUX by `double_blocks` /
`single_blocks` (or diffusers' `single_transformer_blocks`); anything else is UNKNOWN.

A file of LoRA matrices is no checkpoint: `identify_*` tell the two kinds apart, and a LoRA's architecture is
what it was trained on (`_lora_keys`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from modelstore import _lora_keys, _model_dims
from modelstore._folder_weights import component_tensors
from modelstore._model_dims import ModelDims
from modelstore._safetensors_header import SafetensorsHeader, read_header
from modelstore.errors import ModelNotFound
from modelstore.record import Architecture, ModelKind

log = logging.getLogger(__name__)

BASE_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)
REFINER_TIME_IDS = 5  # original size (2), crop top-left (2), aesthetic score (1)
LATENT_CHANNELS = 4  # what a text-to-image UNet reads
INPAINT_CHANNELS = 9  # latent (4) + mask (1) + the masked image's latent (4)

# The real SDXL UNets, by (label_emb shape, cross-attention context): the only way to know a UNet-only file.
_REAL_SDXL_UNETS = {
    ((1280, 2816), 2048): Architecture.SDXL_BASE,
    ((1536, 2560), 1280): Architecture.SDXL_REFINER,
}
# SD 1.x reads CLIP-L's hidden states (768), SD 2.x OpenCLIP ViT-H's (1024).
_CONTEXT_FAMILIES = {768: Architecture.SD1, 1024: Architecture.SD2}

_SD3_PREFIXES = ("model.diffusion_model.joint_blocks.", "joint_blocks.")
_FLUX_PREFIXES = (
    "model.diffusion_model.double_blocks.",
    "model.diffusion_model.single_blocks.",
    "double_blocks.",
    "single_blocks.",
    "single_transformer_blocks.",  # diffusers' FluxTransformer2DModel
)
# Playground v2.5 has SDXL base's exact structure but is an EDM model: with SDXL's schedulers it makes noise.
_EDM_KEYS = ("edm_mean", "edm_std")


@dataclass(frozen=True)
class Identity:
    """What a model's weights are: their kind and the architecture they are (or, for a LoRA, fit)."""

    kind: ModelKind
    architecture: Architecture


def identify_file(path: Path) -> Identity:
    """A single .safetensors file's kind and architecture, from its header only (UnsafeCheckpoint for anything
    that is not safetensors)."""
    return identify_header(read_header(path), name=path.name)


def identify_header(header: SafetensorsHeader, *, name: str = "checkpoint") -> Identity:
    lora = _lora_keys.lora_architecture(header.tensors)
    if lora is not None:
        return Identity(ModelKind.LORA, lora)
    return Identity(ModelKind.CHECKPOINT, detect_header(header, name=name))


def identify_folder(folder: Path) -> Identity:
    """A diffusers folder is always a whole model (`detect_folder`)."""
    return Identity(ModelKind.CHECKPOINT, detect_folder(folder))


def detect_file(path: Path) -> Architecture:
    """The architecture of a single-file checkpoint in the original (civitai / sgm) key layout.

    Reads only the safetensors header; raises UnsafeCheckpoint for anything that is not safetensors.
    """
    return detect_header(read_header(path), name=path.name)


def detect_header(header: SafetensorsHeader, *, name: str = "checkpoint") -> Architecture:
    """The architecture of a single-file checkpoint, from its parsed header."""
    family = _transformer_family(header.tensors)
    if family is not None:
        return family
    if any(key in header.tensors for key in _EDM_KEYS):
        log.info("%s is an EDM checkpoint (Playground v2.5 style); not usable with SDXL schedulers", name)
        return Architecture.UNKNOWN
    return classify(_model_dims.from_single_file(header.tensors), name=name)


def detect_folder(folder: Path) -> Architecture:
    """The architecture of a diffusers-format folder, from its components' safetensors headers.

    Raises ModelNotFound when `folder` is not a diffusers model folder, UnsafeCheckpoint when a component has
    only pickled weights, CorruptModel when one has no weights at all.
    """
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelNotFound(f"{folder} is not a diffusers model folder (no model_index.json)")
    try:
        index = json.loads(index_path.read_text())
    except ValueError:
        raise ModelNotFound(f"{folder} is not a diffusers model folder (unreadable model_index.json)") from None
    if not isinstance(index, dict):
        raise ModelNotFound(f"{folder} is not a diffusers model folder (model_index.json is not an object)")

    def present(component: str) -> bool:
        entry = index.get(component)
        return isinstance(entry, list) and bool(entry) and entry[0] is not None

    if present("transformer"):
        return _transformer_family(component_tensors(folder, "transformer")) or Architecture.UNKNOWN
    if not present("unet") or not (folder / "unet" / "config.json").is_file():
        raise ModelNotFound(f"{folder} is not a diffusers model folder (no unet or transformer)")
    dims = _model_dims.from_diffusers(
        unet=component_tensors(folder, "unet"),
        vae=component_tensors(folder, "vae") if present("vae") else None,
        text_encoder=component_tensors(folder, "text_encoder") if present("text_encoder") else None,
        text_encoder_2=component_tensors(folder, "text_encoder_2") if present("text_encoder_2") else None,
    )
    # The width of one time id is a sinusoidal embedding's size: it has no weights, so only the config has it.
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    time_id_width = unet_config.get("addition_time_embed_dim")
    return classify(dims, time_id_width=time_id_width if isinstance(time_id_width, int) else None, name=folder.name)


def classify(dims: ModelDims, *, time_id_width: int | None = None, name: str = "model") -> Architecture:
    """The architecture `dims` describe; `time_id_width` is addition_time_embed_dim when a config has it."""
    unet = dims.unet
    if unet is None:
        log.info("%s: no UNet found", name)
        return Architecture.UNKNOWN
    if unet.label_emb is None:
        return _CONTEXT_FAMILIES.get(unet.context_dim or 0, Architecture.UNKNOWN)
    if unet.in_channels not in (LATENT_CHANNELS, INPAINT_CHANNELS):
        log.info("%s: SDXL-like UNet with %d input channels", name, unet.in_channels)
        return Architecture.UNKNOWN
    found = _sdxl_unet(dims, unet.label_emb, time_id_width, name)
    if unet.in_channels == LATENT_CHANNELS:
        return found
    # Latent, mask and masked image's latent: an inpainting UNet. Only base-shaped ones exist (SDXL 1.0
    # inpainting 0.1 is the base fine-tuned with a wider conv_in); a refiner-shaped one is no model we know.
    if found is Architecture.SDXL_BASE:
        return Architecture.SDXL_INPAINT
    log.info("%s: %d-channel UNet that is not SDXL base-shaped (%s)", name, unet.in_channels, found.label)
    return Architecture.UNKNOWN


def _sdxl_unet(dims: ModelDims, label_emb: tuple[int, int], time_id_width: int | None, name: str) -> Architecture:
    """SDXL base, refiner or UNKNOWN, from the UNet's text-and-time embedding (`label_emb`), its context and
    the text encoders."""
    context_dim = dims.unet.context_dim if dims.unet is not None else None
    bigg = dims.bigg
    if bigg is None or bigg.projection is None:
        return _REAL_SDXL_UNETS.get((label_emb, context_dim or 0), Architecture.UNKNOWN)
    clip_width = dims.clip_l.width if dims.clip_l is not None else 0
    if context_dim != clip_width + bigg.width:
        log.info(
            "%s: cross-attention context %s is not the text encoders' width %d",
            name,
            context_dim,
            clip_width + bigg.width,
        )
        return Architecture.UNKNOWN
    time_ids = BASE_TIME_IDS if dims.clip_l is not None else REFINER_TIME_IDS
    residual = label_emb[1] - bigg.projection
    if time_id_width is not None:
        fits = residual == time_ids * time_id_width
    else:
        fits = residual > 0 and residual % time_ids == 0
    if not fits:
        log.info(
            "%s: label_emb input %d minus pooled %d is not %d time ids",
            name,
            label_emb[1],
            bigg.projection,
            time_ids,
        )
        return Architecture.UNKNOWN
    return Architecture.SDXL_BASE if dims.clip_l is not None else Architecture.SDXL_REFINER


def _transformer_family(keys: Iterable[str]) -> Architecture | None:
    """SD3 or FLUX from their transformer blocks' key names, or None for anything else."""
    has_context_embedder = has_pos_embed = has_blocks = False
    for key in keys:
        if key.startswith(_SD3_PREFIXES):
            return Architecture.SD3
        if key.startswith(_FLUX_PREFIXES):
            return Architecture.FLUX
        has_context_embedder |= key.startswith("context_embedder.")
        has_pos_embed |= key.startswith("pos_embed.")
        has_blocks |= key.startswith("transformer_blocks.")
    # diffusers' SD3Transformer2DModel: joint blocks are called transformer_blocks, with a patch embedding.
    if has_context_embedder and has_pos_embed and has_blocks:
        return Architecture.SD3
    return None
