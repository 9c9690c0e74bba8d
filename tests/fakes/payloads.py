"""Small generated model files: real safetensors with the key that tells an SDXL base from a refiner."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from io import BytesIO
from typing import Any

import numpy as np
from safetensors.numpy import save

LABEL_EMB = "model.diffusion_model.label_emb.0.0.weight"
# SDXL's label embedding input widths: 2816 for the base (6 time ids), 2560 for the refiner (5).
_LABEL_EMB_SHAPES = {"base": (1280, 2816), "refiner": (1536, 2560)}
# ...and their cross-attention context: CLIP-L + bigG hidden states (2048) for the base, bigG alone for the refiner.
_CONTEXT = {"base": 2048, "refiner": 1280}
CROSS_ATTENTION = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def checkpoint(kind: str = "plain", *, seed: int = 0, extra_bytes: int = 0) -> bytes:
    """A safetensors checkpoint: "base" / "refiner" carry SDXL's label embedding (~4 MB of uint8), "plain" is
    a few KB of an unrecognised model. `seed` makes distinct contents, `extra_bytes` makes it bigger."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "model.diffusion_model.input_blocks.0.0.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float16)
    }
    if kind in _LABEL_EMB_SHAPES:
        tensors[LABEL_EMB] = np.zeros(_LABEL_EMB_SHAPES[kind], dtype=np.uint8)
        tensors[CROSS_ATTENTION] = np.zeros((8, _CONTEXT[kind]), dtype=np.uint8)
    if extra_bytes:
        tensors["padding"] = rng.integers(0, 256, extra_bytes, dtype=np.uint8)
    return bytes(save(tensors, metadata={"format": "pt"}))


def pickle_checkpoint() -> bytes:
    """What a .ckpt is: a pickle (never to be unpickled by the store)."""
    return pickle.dumps({"state_dict": {"weight": [0.0] * 64}}, protocol=4)


def torch_zip_checkpoint() -> bytes:
    """What torch.save writes since 1.6: a zip holding a pickle."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": [0.0] * 64}, protocol=2))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
