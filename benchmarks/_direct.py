"""The two-stage diffusers call made by hand, as the diffusers docs show it (the refiner built with the base's
text_encoder_2 and VAE), optionally with the service's tuning applied to it the same way (the same fused
projections, channels-last, bfloat16 VAE, and UNets compiled by the same code into the same caches, so the
hand-run reuses what the service compiled): what the service adds is then the difference. Each image is PNG
encoded at the service's level, as the service's figures include it."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._service import PROMPT, SEED
from server.core.domain import ImageFormat
from server.generation.compiling import Compiler
from server.generation.encoding import DEFAULT_PNG_LEVEL, encode_image
from server.generation.runner import native_size
from server.generation.tuning import Tuning, tune_pipeline


class Direct:
    def __init__(self, folders: dict[str, Path], device: str, *, tuning: Tuning, max_images: int) -> None:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        common: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
        self.base = StableDiffusionXLPipeline.from_pretrained(str(folders["A"]), add_watermarker=False, **common)
        self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(folders["R"]), text_encoder_2=self.base.text_encoder_2, vae=self.base.vae, add_watermarker=False,
            **common,
        )  # fmt: skip
        self.device = device
        self.compiler = None
        if tuning.compile_mode:
            self.compiler = Compiler(device, tuning.compile_mode, max_images=max_images, max_sizes=0)
        for name, pipe in (("base", self.base), ("refiner", self.refiner)):
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            if not tuning.untuned:
                tune_pipeline(pipe, tuning, compiler=self.compiler, model=f"hand-run {name}", role=name)

    def compile(self, timeout_s: float) -> bool:
        """Compile both UNets at the native size now (from the caches the service filled, if it ran first)."""
        if self.compiler is None:
            return True
        width, height = native_size(self.base)
        for pipe in (self.base, self.refiner):
            self.compiler.request_size(pipe.unet, width, height)
        return self.compiler.wait_idle(timeout_s)

    def generate(self, size: int, steps: int, base_steps: int, n: int = 1) -> tuple[float, float, list[Any]]:
        """Seconds for the whole call with PNG encoding, for the base stage alone, and the images."""
        from diffusers import EulerDiscreteScheduler

        config = self.base.scheduler.config
        grid = EulerDiscreteScheduler.from_config(config)
        grid.set_timesteps(steps)
        fraction = 1 - (math.floor(float(grid.timesteps[base_steps])) + 1) / 1000
        self.base.scheduler = EulerDiscreteScheduler.from_config(config)
        self.refiner.scheduler = EulerDiscreteScheduler.from_config(config)
        sync(self.device)
        started = time.perf_counter()
        generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(n)]
        latents = self.base(
            prompt=[PROMPT] * n, width=size, height=size, num_inference_steps=steps, denoising_end=fraction,
            generator=generators, output_type="latent",
        ).images  # fmt: skip
        sync(self.device)
        base_s = time.perf_counter() - started
        images = self.refiner(
            prompt=[PROMPT] * n, image=latents, num_inference_steps=steps, denoising_start=fraction,
            generator=generators,
        ).images  # fmt: skip
        for image in images:
            encode_image(image, ImageFormat.PNG, png_level=DEFAULT_PNG_LEVEL)
        return time.perf_counter() - started, base_s, images

    def close(self) -> None:
        if self.compiler is not None:
            self.compiler.close(0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
