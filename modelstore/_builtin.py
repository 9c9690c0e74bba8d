"""The built-in tiny SDXL-architecture models: `builtin:tiny-sdxl-base@1` and `builtin:tiny-sdxl-refiner@1`
(and the base variants @2 and @3: the same shapes with other random weights, for distinct pairs in fleet tests),
and `builtin:tiny-sdxl-inpaint@1`, an inpainting base: base @1's structure and text encoders and VAE, with a
UNet of its own whose input convolution reads 9 channels (latent, mask, masked image's latent).

They have the exact structure of the real SDXL pair, only tiny, so the whole service (split, previews, the
single-file round trip of the model-store issue) runs on a laptop CPU with no network:

- the base has CLIP-L and OpenCLIP-bigG-style text encoders, `force_zeros_for_empty_prompt=True` and
  `requires_aesthetics_score=False` (6 time ids); the refiner has only `text_encoder_2` and
  `requires_aesthetics_score=True` (5 time ids), like stabilityai/stable-diffusion-xl-refiner-1.0;
- the refiner shares the base's VAE and `text_encoder_2` weights bit for bit, as the official pair does, so
  content-hash deduplication has something real to find;
- CLIP-L and bigG widths differ (32 vs 40), the bigG projection (24) differs from its width, and both text
  encoders have 10 layers: with equal widths diffusers' single-file loader silently loads the wrong weights,
  a square projection hides a missing transpose, and fewer than 10 layers defeats its model-type detection
  (shared/research/single-file.md, P1, P3, P5);
- the tokenizers are the real SDXL CLIP tokenizers that ship with the package (full 49,408-token vocabulary,
  77 tokens), so prompts tokenize exactly as they would for the real models.

Weights are random, drawn from fixed seeds, and stored as fp16 safetensors (a few MB, like civitai's fp16
files); `build` is deterministic for a given torch version, and `install` builds one into the cache, where it is
kept like a download. `write_config_folder` writes the same folder without weights: what `_config_families`
gives diffusers as `config=` when one of these models arrives as a single civitai-style file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelstore._architecture import INPAINT_CHANNELS, LATENT_CHANNELS, Identity, identify_folder
from modelstore._cache import Cache, Need
from modelstore._digests import full_digests
from modelstore._model_dims import TINY_BIGG_WIDTH, TINY_CLIP_L_WIDTH
from modelstore._staging import staging_folder
from modelstore.air import AIR
from modelstore.errors import ModelNotFound
from modelstore.record import Architecture, Layout, ModelRecord

CONFIG_ROOT = Path(__file__).parent / "configs"

# Tiny stand-ins for SDXL's widths: CLIP-L 768 -> 32, bigG 1280 -> 40 (projection 1280 -> 24).
_CLIP_L_WIDTH = TINY_CLIP_L_WIDTH
_BIGG_WIDTH = TINY_BIGG_WIDTH
_BIGG_PROJECTION = 24
_TIME_EMBED_DIM = 8
_SEED = 20260101


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    version: str
    architecture: Architecture  # SDXL_BASE, SDXL_REFINER or SDXL_INPAINT
    # Variants differ only by their seed: other weights of the same architecture, so content-hash sharing
    # finds nothing in common and each is a distinct pair in memory (what the fleet tests need).
    seed: int = _SEED

    @property
    def air(self) -> str:
        return f"builtin:{self.name}@{self.version}"

    @property
    def refiner(self) -> bool:
        return self.architecture is Architecture.SDXL_REFINER

    @property
    def in_channels(self) -> int:
        return INPAINT_CHANNELS if self.architecture is Architecture.SDXL_INPAINT else LATENT_CHANNELS


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.air: m
    for m in (
        BuiltinModel("tiny-sdxl-base", "1", Architecture.SDXL_BASE),
        BuiltinModel("tiny-sdxl-refiner", "1", Architecture.SDXL_REFINER),
        BuiltinModel("tiny-sdxl-base", "2", Architecture.SDXL_BASE, seed=_SEED + 1000),
        BuiltinModel("tiny-sdxl-base", "3", Architecture.SDXL_BASE, seed=_SEED + 2000),
        # The same seed as base @1: its text encoders and VAE are the base's bit for bit (as the real
        # inpainting model shares SDXL base's), so it pairs with the tiny refiner and shares their memory.
        BuiltinModel("tiny-sdxl-inpaint", "1", Architecture.SDXL_INPAINT),
    )
}


def _clip_config(width: int, projection: int, act: str) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModelWithProjection" if act == "gelu" else "CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": width * 2,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 10,
        "pad_token_id": 1,
        "projection_dim": projection,
        "vocab_size": 49408,
    }


def clip_l_config() -> dict[str, Any]:
    return _clip_config(_CLIP_L_WIDTH, _CLIP_L_WIDTH, "quick_gelu")


def bigg_config() -> dict[str, Any]:
    return _clip_config(_BIGG_WIDTH, _BIGG_PROJECTION, "gelu")


def unet_config(refiner: bool, in_channels: int = LATENT_CHANNELS) -> dict[str, Any]:
    # Base: cross-attention over [CLIP-L, bigG] hidden states, 6 time ids; refiner: bigG only, 5 time ids,
    # wider first block (real: 320 vs 384), as in the real pair. An inpainting base reads 9 channels.
    time_ids = 5 if refiner else 6
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TIME_EMBED_DIM,
        "attention_head_dim": [2, 4],
        "block_out_channels": [48, 96] if refiner else [32, 64],
        "cross_attention_dim": _BIGG_WIDTH if refiner else _CLIP_L_WIDTH + _BIGG_WIDTH,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "in_channels": in_channels,
        "layers_per_block": 2,
        "norm_num_groups": 16,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": time_ids * _TIME_EMBED_DIM + _BIGG_PROJECTION,
        "sample_size": 8,  # 8 latent pixels x vae scale 8 = a native 64x64 image
        "transformer_layers_per_block": [1, 2],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    }


_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    # Four levels like SDXL's VAE, so the latent is 1/8 of the image and previews/sizes behave as for real.
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


# What the Hub's diffusers/stable-diffusion-xl-1.0-inpainting-0.1 says in its model_index.json beside SDXL
# base's entries, so that the tiny model is laid out like the real one.
_INPAINT_INDEX = {"_class_name": "StableDiffusionXLInpaintPipeline", "requires_aesthetics_score": False}
# Each UNet its own draw (after the text encoders' and the VAE's, seeds + 1..3).
_UNET_SEEDS = {Architecture.SDXL_BASE: 4, Architecture.SDXL_REFINER: 5, Architecture.SDXL_INPAINT: 6}


def _from_config(cls: Any, config: dict[str, Any]) -> Any:
    return cls.from_config(config)  # diffusers leaves from_config untyped


def write_config_folder(model: BuiltinModel, dest: Path) -> None:
    """Write `model`'s diffusers folder without weights (configs, tokenizers, scheduler) at `dest`.

    This is what a civitai user ships beside a single-file checkpoint, and what diffusers' `from_single_file`
    needs as `config=` to load the tiny models offline (shared/research/single-file.md P7). `build` writes the
    same files and adds the weights, so the two can never disagree.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    reference = CONFIG_ROOT / ("sdxl_refiner" if model.refiner else "sdxl_base")
    dest.mkdir(parents=True)
    index = json.loads((reference / "model_index.json").read_text())
    index["_name_or_path"] = model.air
    if model.architecture is Architecture.SDXL_INPAINT:
        index |= _INPAINT_INDEX
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    shutil.copytree(reference / "scheduler", dest / "scheduler")
    tokenizers = ["tokenizer_2"] if model.refiner else ["tokenizer", "tokenizer_2"]
    for name in tokenizers:
        shutil.copytree(reference / name, dest / name)
    # diffusers writes every default into a saved config; building the modules on the meta device (no
    # memory, no random draws) gives exactly the files `save_config` wrote when the weights were made.
    with torch.device("meta"):
        unet = _from_config(UNet2DConditionModel, unet_config(model.refiner, model.in_channels))
        vae = _from_config(AutoencoderKL, _VAE_CONFIG)
    unet.save_config(dest / "unet")
    vae.save_config(dest / "vae")
    CLIPTextConfig(**bigg_config()).save_pretrained(dest / "text_encoder_2")
    if not model.refiner:
        CLIPTextConfig(**clip_l_config()).save_pretrained(dest / "text_encoder")


def build(model: BuiltinModel, dest: Path) -> None:
    """Write `model` as a diffusers-format folder of fp16 safetensors at `dest` (which must not exist)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    write_config_folder(model, dest)

    def save(module: Any, name: str) -> None:
        # Weights written by hand rather than with save_pretrained: no progress bars, no dtype-cast warnings,
        # and the exact file names both diffusers and transformers look for.
        is_diffusers = hasattr(module, "save_config")
        weights = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
        filename = "diffusion_pytorch_model.safetensors" if is_diffusers else "model.safetensors"
        save_file(weights, str(dest / name / filename), metadata={"format": "pt"})

    # Every module is drawn from its own fixed seed, so the refiner's shared components equal the base's.
    # The modules are built from the configs just written: the same arguments, so the same draws.
    torch.manual_seed(model.seed + 1)
    save(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(dest / "text_encoder_2")), "text_encoder_2")
    torch.manual_seed(model.seed + 2)
    save(_from_config(AutoencoderKL, AutoencoderKL.load_config(dest / "vae")), "vae")
    if not model.refiner:
        torch.manual_seed(model.seed + 3)
        save(CLIPTextModel(CLIPTextConfig.from_pretrained(dest / "text_encoder")), "text_encoder")
    torch.manual_seed(model.seed + _UNET_SEEDS[model.architecture])
    save(_from_config(UNet2DConditionModel, UNet2DConditionModel.load_config(dest / "unet")), "unet")


def install(air: AIR, cache: Cache, in_use: Callable[[str], bool]) -> ModelRecord:
    """Build the built-in model `air` names and keep it in `cache` (quota and all, like a download)."""
    spec = BUILTIN_MODELS.get(air.canonical)
    if spec is None:
        names = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelNotFound(f"no built-in model {air.canonical} (built-in: {names})")
    return keep(
        air,
        cache,
        in_use,
        lambda folder: build(spec, folder),
        layout=Layout.DIFFUSERS,
        metadata={"source": "builtin", "name": spec.name, "version": spec.version},
        detect=identify_folder,
    )


def keep(
    air: AIR,
    cache: Cache,
    in_use: Callable[[str], bool],
    write: Callable[[Path], None],
    *,
    layout: Layout,
    metadata: Mapping[str, Any],
    detect: Callable[[Path], Identity],
) -> ModelRecord:
    """Keep the folder `write` creates (a diffusers folder, or one holding the `SINGLE_FILE_NAME` of a single
    file) in `cache` as `air`: its files adopted as blobs within the quota, then committed like a download."""
    with staging_folder(cache.root / "tmp", "builtin-") as staging:
        folder = staging / "model"
        write(folder)
        paths = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
        digests = {relative: full_digests(path) for relative, path in paths.items()}
        shas = {relative: sha256 for relative, (sha256, _) in digests.items()}
        with cache.reserve(air, [Need(shas[r], p.stat().st_size) for r, p in paths.items()], in_use):
            for relative, path in paths.items():
                check = relative if relative.endswith(".safetensors") else None
                sha256, fast = digests[relative]
                cache.blobs.adopt(path, sha256, fast_digest=fast, check_safetensors_as=check)
            return cache.commit(air, source="builtin", layout=layout, files=shas, metadata=metadata, detect=detect)
