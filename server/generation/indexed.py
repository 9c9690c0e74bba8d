"""diffusers' SDXL img2img and inpaint pipelines, run over an exact slice of the timestep grid.

diffusers derives where a call starts from `strength` (`int(N * strength)` steps) or from `denoising_start` (an
integer-timestep cutoff), and where it ends from `denoising_end` (another cutoff). On DPM++ 2M Karras grids from
45 steps up, neighbouring timesteps share an integer and no cutoff can split there, so these classes take the
indexes directly: `start_index` and `end_index` slice `scheduler.timesteps` (every sampler offered is first
order: one entry per step). Everything else is diffusers' own code: the VAE encode of the seed image, the noise
added at the first timestep that runs (only without `denoising_start`, as in diffusers), the inpaint mask's
blend after every step. Ending by slicing rather than by interrupting matters for inpainting: on a call's last
step diffusers blends the *clean* image latents back (no next timestep to noise them to), exactly as a hand-run
with `denoising_end` does.

The pipelines are built per batch from a loaded pipeline's components: no weights are copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline


class _VacuousCastWarning(logging.Filter):
    """SDXL img2img and inpaint move the VAE to float32 to encode the seed image (`force_upcast`), and diffusers
    then warns about "modules that should be kept in float32: []" on every request: an empty list, so there is
    nothing to warn about. Only that exact vacuous warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_VacuousCastWarning())


_R = TypeVar("_R")


class _GridSlice:
    """Overrides `get_timesteps` of an SDXL img2img-style pipeline to run `timesteps[start_index:end_index]`."""

    start_index: int | None = None
    end_index: int | None = None
    scheduler: Any

    def get_timesteps(
        self, num_inference_steps: int, strength: float, device: Any, denoising_start: float | None = None
    ) -> tuple[torch.Tensor, int]:
        if self.start_index is None:
            return super().get_timesteps(num_inference_steps, strength, device, denoising_start)  # type: ignore[misc,no-any-return]
        timesteps = self.scheduler.timesteps[self.start_index : self.end_index]
        if hasattr(self.scheduler, "set_begin_index"):  # DDIM has no step index to position
            self.scheduler.set_begin_index(self.start_index)
        return timesteps, len(timesteps)


def _keeping_vae_dtype(vae: Any, encode: Callable[[], _R]) -> _R:
    """Run `encode`, then put the VAE back in its own dtype. To encode a seed image diffusers moves a
    `force_upcast` VAE to float32 and back to the *UNet's* dtype, which undoes a tuned VAE's bfloat16
    (`tuning.decode_in_bfloat16`): its decode hook would then hand bfloat16 latents to float16 weights, on this
    request and every later one."""
    dtype = vae.dtype
    try:
        return encode()
    finally:
        if vae.dtype != dtype:
            vae.to(dtype=dtype)


class IndexedImg2Img(_GridSlice, StableDiffusionXLImg2ImgPipeline):  # type: ignore[misc]
    """SDXL img2img over a slice of the grid: the refiner's continuation, and img2img from a seed image."""

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        return _keeping_vae_dtype(self.vae, lambda: super(IndexedImg2Img, self).prepare_latents(*args, **kwargs))


class IndexedInpaint(_GridSlice, StableDiffusionXLInpaintPipeline):  # type: ignore[misc]
    """SDXL inpainting over a slice of the grid. Keeps the image latents it blends back (4-channel UNets), which
    compare needs to form the hand-off a stopped base would have produced."""

    image_latents: torch.Tensor | None = None

    def _encode_vae_image(self, image: torch.Tensor, generator: Any) -> torch.Tensor:
        encoded: torch.Tensor = _keeping_vae_dtype(
            self.vae, lambda: super(IndexedInpaint, self)._encode_vae_image(image, generator)
        )
        return encoded

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        outputs = super().prepare_latents(*args, **kwargs)
        if kwargs.get("return_image_latents"):
            self.image_latents = outputs[-1]
        return outputs


def img2img(pipe: Any, start_index: int, end_index: int | None = None) -> IndexedImg2Img:
    """An img2img pipeline over `pipe`'s components (base or refiner), running grid indexes start..end-1."""
    built = IndexedImg2Img(**pipe.components, **_flags(pipe))
    return _sliced(built, start_index, end_index)


def inpaint(pipe: Any, start_index: int, end_index: int | None = None) -> IndexedInpaint:
    """An inpaint pipeline over `pipe`'s components (base or refiner), running grid indexes start..end-1."""
    built = IndexedInpaint(**pipe.components, **_flags(pipe))
    return _sliced(built, start_index, end_index)


_Pipe = TypeVar("_Pipe", IndexedImg2Img, IndexedInpaint)


def _sliced(pipe: _Pipe, start_index: int, end_index: int | None) -> _Pipe:
    pipe.set_progress_bar_config(disable=True)
    pipe.start_index, pipe.end_index = start_index, end_index
    return pipe


def _flags(pipe: Any) -> dict[str, Any]:
    """The loaded pipeline's own conditioning flags: a base has no aesthetic score, a refiner does."""
    config = pipe.config
    return {
        "requires_aesthetics_score": bool(getattr(config, "requires_aesthetics_score", False)),
        "force_zeros_for_empty_prompt": bool(config.force_zeros_for_empty_prompt),
        "add_watermarker": False,
    }
