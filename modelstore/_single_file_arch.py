"""Architecture of a single-file checkpoint, from its safetensors header: a deliberately minimal stand-in.

The `loading` branch adds the real `modelstore.architecture.detect_file` (header-based detection of SDXL,
SD 1.x/2.x, SD3, FLUX); once it is merged, the store calls that and this module goes. Until then only the
question the store must answer is covered: is it an SDXL base or an SDXL refiner? SDXL's UNet embeds its
text-and-time conditioning through `label_emb.0.0`, whose input width is 2816 for the base (6 time ids) and
2560 for the refiner (5 time ids, shared/research/diffusers.md §2).
"""

from __future__ import annotations

from pathlib import Path

from modelstore.record import Architecture
from modelstore.safetensors_header import read_header

_LABEL_EMB = "model.diffusion_model.label_emb.0.0.weight"
_BY_SHAPE: dict[tuple[int, ...], Architecture] = {
    (1280, 2816): Architecture.SDXL_BASE,
    (1536, 2560): Architecture.SDXL_REFINER,
}


def detect_file(path: Path) -> Architecture:
    shape = read_header(path).shape(_LABEL_EMB)
    return _BY_SHAPE.get(shape, Architecture.UNKNOWN) if shape is not None else Architecture.UNKNOWN
