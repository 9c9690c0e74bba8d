"""The few dimensions that tell SDXL-shaped models apart, read from weights' headers or from configs.

Three readers give the same `ModelDims`, so a checkpoint can be compared with a folder of configs:

- `from_single_file`: a checkpoint in the original (sgm / civitai) key layout, from its safetensors header;
- `from_diffusers`: the safetensors headers of a diffusers folder's components (diffusers key names);
- `from_configs`: a diffusers folder's JSON configs alone (a config-only folder has no weights).

Only shapes and key names are used; no tensor is ever read. The original key layout is the one verified in
shared/research/single-file.md ("Exact key layout").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelstore._safetensors_header import TensorInfo

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model."
BIGG_AFTER_CLIP_L = "conditioner.embedders.1.model."  # SDXL base: [CLIP-L, bigG]
BIGG_ALONE = "conditioner.embedders.0.model."  # SDXL refiner: [bigG]

# The built-in tiny models' text-encoder widths, stand-ins for CLIP-L's 768 and bigG's 1280 (`_builtin` builds
# them; here so that what reads LoRA shapes, `_lora_keys`, knows them without importing the builder).
TINY_CLIP_L_WIDTH = 32
TINY_BIGG_WIDTH = 40

_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
_OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.")


@dataclass(frozen=True)
class UNetDims:
    in_channels: int
    model_channels: int  # width of the first block (SDXL: 320 base, 384 refiner)
    # The text-and-time ("adm") embedding's first layer as [out, in] (SDXL: [1280, 2816] base, [1536, 2560]
    # refiner); None when the UNet has none (SD 1.x / 2.x).
    label_emb: tuple[int, int] | None
    context_dim: int | None  # width of the cross-attention context (the concatenated text hidden states)


@dataclass(frozen=True)
class TextEncoderDims:
    width: int
    layers: int
    projection: int | None = None  # bigG's pooled projection width; None for CLIP-L


@dataclass(frozen=True)
class VaeDims:
    channels: int
    latent_channels: int


@dataclass(frozen=True)
class ModelDims:
    """What an SDXL-shaped model is made of; a part that is absent (or unreadable) is None.

    `bigg` is only filled where SDXL puts it: after CLIP-L (base layout) or alone (refiner layout).
    """

    unet: UNetDims | None
    vae: VaeDims | None
    clip_l: TextEncoderDims | None
    bigg: TextEncoderDims | None

    def describe(self) -> str:
        """A one-line account for error messages and logs."""
        parts = []
        if self.unet is not None:
            emb = "none" if self.unet.label_emb is None else list(self.unet.label_emb)
            parts.append(
                f"UNet in={self.unet.in_channels} channels={self.unet.model_channels} "
                f"label_emb={emb} context={self.unet.context_dim}"
            )
        else:
            parts.append("no UNet")
        for name, te in (("CLIP-L", self.clip_l), ("bigG", self.bigg)):
            if te is not None:
                projection = "" if te.projection is None else f" projection={te.projection}"
                parts.append(f"{name} width={te.width} layers={te.layers}{projection}")
        if self.vae is not None:
            parts.append(f"VAE channels={self.vae.channels} latent={self.vae.latent_channels}")
        else:
            parts.append("no VAE")
        return ", ".join(parts)


def _shape(tensors: Mapping[str, TensorInfo], key: str) -> tuple[int, ...] | None:
    info = tensors.get(key)
    return None if info is None else info.shape


def _context_dim(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    # Every cross-attention key projection reads the same context; more than one width is not SDXL-shaped.
    widths = {
        info.shape[1]
        for key, info in tensors.items()
        if key.startswith(prefix) and key.endswith(".attn2.to_k.weight") and len(info.shape) == 2
    }
    return widths.pop() if len(widths) == 1 else None


def _layer_count(tensors: Mapping[str, TensorInfo], prefix: str, pattern: re.Pattern[str]) -> int:
    layers = set()
    for key in tensors:
        if key.startswith(prefix):
            match = pattern.match(key, len(prefix))
            if match:
                layers.add(int(match.group(1)))
    return len(layers)


def _unet(tensors: Mapping[str, TensorInfo], prefix: str, conv_in: str, label_emb: str) -> UNetDims | None:
    conv = _shape(tensors, prefix + conv_in)
    if conv is None or len(conv) != 4:
        return None
    emb = _shape(tensors, prefix + label_emb)
    return UNetDims(
        in_channels=conv[1],
        model_channels=conv[0],
        label_emb=(emb[0], emb[1]) if emb is not None and len(emb) == 2 else None,
        context_dim=_context_dim(tensors, prefix),
    )


def _vae(tensors: Mapping[str, TensorInfo], prefix: str) -> VaeDims | None:
    encoder_in = _shape(tensors, prefix + "encoder.conv_in.weight")
    decoder_in = _shape(tensors, prefix + "decoder.conv_in.weight")
    if encoder_in is None or decoder_in is None or len(encoder_in) != 4 or len(decoder_in) != 4:
        return None
    return VaeDims(channels=encoder_in[0], latent_channels=decoder_in[1])


def _hf_clip(tensors: Mapping[str, TensorInfo], prefix: str) -> TextEncoderDims | None:
    embedding = _shape(tensors, prefix + "embeddings.token_embedding.weight")
    if embedding is None or len(embedding) != 2:
        return None
    return TextEncoderDims(width=embedding[1], layers=_layer_count(tensors, prefix, _CLIP_LAYER))


def _open_clip(tensors: Mapping[str, TensorInfo], prefix: str) -> TextEncoderDims | None:
    embedding = _shape(tensors, prefix + "token_embedding.weight")
    if embedding is None or len(embedding) != 2:
        return None
    projection = _shape(tensors, prefix + "text_projection")  # [width, projection]: stored transposed (P5)
    return TextEncoderDims(
        width=embedding[1],
        layers=_layer_count(tensors, prefix, _OPEN_CLIP_LAYER),
        projection=projection[1] if projection is not None and len(projection) == 2 else None,
    )


def from_single_file(tensors: Mapping[str, TensorInfo]) -> ModelDims:
    """Dimensions of a checkpoint in the original key layout (civitai / sgm)."""
    clip_l = _hf_clip(tensors, CLIP_L)
    return ModelDims(
        unet=_unet(tensors, UNET, "input_blocks.0.0.weight", "label_emb.0.0.weight"),
        vae=_vae(tensors, VAE),
        clip_l=clip_l,
        bigg=_open_clip(tensors, BIGG_AFTER_CLIP_L if clip_l is not None else BIGG_ALONE),
    )


def from_diffusers(
    unet: Mapping[str, TensorInfo],
    vae: Mapping[str, TensorInfo] | None,
    text_encoder: Mapping[str, TensorInfo] | None,
    text_encoder_2: Mapping[str, TensorInfo] | None,
) -> ModelDims:
    """Dimensions of a diffusers folder, from its components' headers (None: the component is absent)."""
    clip_l = None
    if text_encoder is not None:
        # transformers >= 5.6 saves CLIPTextModel without the `text_model.` prefix; older files have it (P4).
        clip_l = _hf_clip(text_encoder, "text_model.") or _hf_clip(text_encoder, "")
    bigg = None
    if text_encoder_2 is not None:
        found = _hf_clip(text_encoder_2, "text_model.")
        projection = _shape(text_encoder_2, "text_projection.weight")  # [projection, width] in HF layout
        if found is not None:
            bigg = TextEncoderDims(
                found.width,
                found.layers,
                projection[0] if projection is not None and len(projection) == 2 else None,
            )
    return ModelDims(
        unet=_unet(unet, "", "conv_in.weight", "add_embedding.linear_1.weight"),
        vae=None if vae is None else _vae(vae, ""),
        clip_l=clip_l,
        bigg=bigg,
    )


def _json(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a JSON object")
    return document


def from_configs(folder: Path) -> ModelDims:
    """Dimensions a diffusers folder's configs promise (what its weights must have to load completely)."""
    index = _json(folder / "model_index.json")

    def present(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, list) and bool(entry) and entry[0] is not None

    unet_config = _json(folder / "unet" / "config.json")
    channels = int(unet_config["block_out_channels"][0])
    label_emb = None
    if unet_config.get("addition_embed_type") == "text_time":
        time_embed_width = int(unet_config.get("time_embedding_dim") or 4 * channels)
        label_emb = (time_embed_width, int(unet_config["projection_class_embeddings_input_dim"]))
    unet = UNetDims(
        in_channels=int(unet_config["in_channels"]),
        model_channels=channels,
        label_emb=label_emb,
        context_dim=int(unet_config["cross_attention_dim"]),
    )
    vae_config = _json(folder / "vae" / "config.json")
    vae = VaeDims(int(vae_config["block_out_channels"][0]), int(vae_config["latent_channels"]))

    def text_encoder(name: str, with_projection: bool) -> TextEncoderDims | None:
        if not present(name):
            return None
        config = _json(folder / name / "config.json")
        return TextEncoderDims(
            width=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            projection=int(config["projection_dim"]) if with_projection else None,
        )

    return ModelDims(
        unet=unet,
        vae=vae,
        clip_l=text_encoder("text_encoder", with_projection=False),
        bigg=text_encoder("text_encoder_2", with_projection=True),
    )
