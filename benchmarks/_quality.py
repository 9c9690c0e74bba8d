"""What the inexact speed options cost in pixels, on the benchmark's random-weight models: the VAE decode in
bfloat16 (and float16, which SDXL's VAE is known to overflow in) against float32 on the same latent, and the
UNets' linear layers in FP8 against float16 on the same seed. Random weights make these bounds on rounding,
not judgements of picture quality."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._direct import Direct, sync


def pixel_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """a, b: images in 0..255. Largest and mean absolute difference, PSNR in dB, share of non-finite values."""
    finite = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(np.where(finite, a, 0) - np.where(finite, b, 0))
    mse = float((diff**2).mean())
    return {
        "max_abs": round(float(diff.max()), 3),
        "mean_abs": round(float(diff.mean()), 4),
        "psnr_db": round(10 * np.log10(255**2 / mse), 2) if mse > 0 else float("inf"),
        "non_finite_share": round(float(1 - finite.mean()), 6),
    }


def vae_decode_difference(folder: Path, device: str, size: int) -> dict[str, Any]:
    """Decode one random latent (scaled as the pipelines scale it) in float32, bfloat16 and float16."""
    from diffusers import AutoencoderKL

    reference = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).to(device)
    torch.manual_seed(0)
    latent = torch.randn(1, 4, size // 8, size // 8, device=device) / reference.config.scaling_factor
    images: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        vae = copy.deepcopy(reference).to(dtype)
        with torch.no_grad():
            vae.decode(latent.to(dtype))  # warm-up (cuDNN picks its algorithms)
            sync(device)
            started = time.perf_counter()
            decoded = vae.decode(latent.to(dtype)).sample
            sync(device)
        seconds[name] = round(time.perf_counter() - started, 4)
        images[name] = ((decoded.float().clamp(-1, 1) + 1) * 127.5).cpu().numpy()
        del vae
    return {
        "decode_s": seconds,
        "bfloat16_vs_float32": pixel_difference(images["bfloat16"], images["float32"]),
        "float16_vs_float32": pixel_difference(images["float16"], images["float32"]),
    }


def fp8_difference(direct: Direct, size: int, steps: int, base_steps: int) -> dict[str, Any]:
    """One image with the hand-run pipelines as they are, then with their UNets' linear layers in FP8 (they
    stay so: run this last). Eager FP8 (its compiled graphs would be other graphs), so no timing here."""
    from server.generation.tuning import linears_to_fp8

    before = _image(direct, size, steps, base_steps)
    for pipe in (direct.base, direct.refiner):
        linears_to_fp8(pipe.unet)
    after = _image(direct, size, steps, base_steps)
    return {"fp8_vs_float16": pixel_difference(after, before)}


def _image(direct: Direct, size: int, steps: int, base_steps: int) -> np.ndarray:
    return np.asarray(direct.generate(size, steps, base_steps)[2][0], dtype=np.float64)
