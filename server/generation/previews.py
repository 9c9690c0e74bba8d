"""Cheap previews: the latent mapped straight to RGB, with no VAE (shared/research/diffusers.md §4.1).

A linear map of SDXL's four latent channels to RGB (ComfyUI's published SDXL factors) gives one pixel per latent
pixel, i.e. 1/8 of the output size: 128x128 at 1024x1024, for well under a millisecond of work.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

# Rows: latent channels; columns: R, G, B. Expects latents in the UNet's (scaled, variance-preserving) space.
_LATENT_RGB = torch.tensor(
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ]
)
_LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])

PREVIEW_MIME = "image/jpeg"


def latents_to_images(latents: torch.Tensor) -> list[Image.Image]:
    """(B, 4, h, w) variance-preserving latents -> B RGB images of h x w."""
    x = latents.detach().to(device="cpu", dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->bhwr", x, _LATENT_RGB) + _LATENT_RGB_BIAS
    pixels = ((rgb.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(p, mode="RGB") for p in pixels]


def encode_preview(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
