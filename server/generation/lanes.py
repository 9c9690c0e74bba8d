"""One image's denoising state at one stage, kept outside any pipeline call, so that images of different requests
at different steps can share a UNet call (step-level batching, `stepper.py`).

A lane is exactly what diffusers' SDXL loop keeps for one image, built with diffusers' own methods:

- **Start** (the base, text-to-image): `prepare_latents` draws the image's noise from its own generator and scales it
  by the scheduler's `init_noise_sigma`; the scheduler is a fresh one of the request's sampler on the base model's
  config, `set_timesteps(N)` and begun at index 0, as `StableDiffusionXLPipeline.__call__` does.
- **Hand-off** (the refiner): a fresh scheduler begun at index `base_steps` of the same grid, the base's latent as
  it is (no noise added) and the same generators, as the img2img pipeline's `denoising_start` path with the runner's
  index slice (`indexed.py`). With compare, the refiner's lane starts from copies (latent and generator states).
- **Conditioning**: rows `[unconditional, conditional]` with classifier-free guidance (`[conditional]` without),
  each stage's own prompt embeddings, pooled embeddings and time ids (`_get_add_time_ids` of the stage's own
  pipeline: target size for the base, aesthetic scores for the refiner).
- **A step** (`step`): `scale_model_input`, the UNet's noise for the lane's rows (computed in a shared call),
  guidance `uncond + g * (cond - uncond)`, then the scheduler's `step` with the lane's generators: an ancestral
  sampler's noise and a multistep sampler's history are the lane's own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from server.core.domain import RenderShape, Stage
from server.generation.samplers import make_scheduler


@dataclass
class StageConditioning:
    """One image's text conditioning for one stage, as UNet rows."""

    embeds: torch.Tensor  # (rows, 77 * windows, dim)
    text_embeds: torch.Tensor  # (rows, pooled dim)
    time_ids: torch.Tensor  # (rows, 5 or 6)


@dataclass
class Lane:
    """One image at one stage: its scheduler, latent, generator and conditioning, and where it is in its slice."""

    stage: Stage
    scheduler: Any
    timesteps: torch.Tensor  # the slice of the grid this lane runs
    latents: torch.Tensor  # (1, 4, h/8, w/8)
    generators: list[torch.Generator]
    conditioning: StageConditioning
    guidance: float
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    done: int = 0  # steps taken of `timesteps`

    @property
    def finished(self) -> bool:
        return self.done >= len(self.timesteps)

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.done]

    def model_input(self) -> torch.Tensor:
        latents = torch.cat([self.latents] * 2) if self.cfg else self.latents
        scaled: torch.Tensor = self.scheduler.scale_model_input(latents, self.timestep)
        return scaled

    def step(self, noise: torch.Tensor) -> None:
        """Advance one step with the UNet's output for this lane's rows."""
        if self.cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + self.guidance * (cond - uncond)
        self.latents = self.scheduler.step(noise, self.timestep, self.latents, **self.step_kwargs, return_dict=False)[0]
        self.done += 1


def base_lane(
    pipe: Any, shape: RenderShape, generator: torch.Generator, conditioning: StageConditioning, device: Any
) -> Lane:
    """A text-to-image image's base lane: noise from its generator, the base's slice of the grid."""
    scheduler = _scheduler(pipe, shape, begin=0)
    end = shape.base_steps if shape.refiner_steps and not shape.compare else shape.steps
    latent_shape = (1, pipe.vae.config.latent_channels, shape.height // pipe.vae_scale_factor,
                    shape.width // pipe.vae_scale_factor)  # fmt: skip
    noise = randn_tensor(latent_shape, generator=[generator], device=device, dtype=conditioning.embeds.dtype)
    latents = noise * scheduler.init_noise_sigma
    return _lane(Stage.BASE, scheduler, scheduler.timesteps[:end], latents, [generator], conditioning, shape)


def refiner_lane(
    base_config: Any,
    shape: RenderShape,
    latents: torch.Tensor,
    generators: list[torch.Generator],
    conditioning: StageConditioning,
) -> Lane:
    """The refiner's lane from the base's latent at the hand-off (no noise added), on the same grid."""
    scheduler = make_scheduler(shape.sampler, base_config)
    scheduler.set_timesteps(shape.steps, device=latents.device)
    if hasattr(scheduler, "set_begin_index"):  # DDIM has no step index to position
        scheduler.set_begin_index(shape.base_steps)
    timesteps = scheduler.timesteps[shape.base_steps :]
    return _lane(Stage.REFINER, scheduler, timesteps, latents, generators, conditioning, shape)


def _scheduler(pipe: Any, shape: RenderShape, *, begin: int) -> Any:
    scheduler = make_scheduler(shape.sampler, pipe.scheduler.config)
    scheduler.set_timesteps(shape.steps, device=pipe._execution_device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler


def _lane(
    stage: Stage,
    scheduler: Any,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    generators: list[torch.Generator],
    conditioning: StageConditioning,
    shape: RenderShape,
) -> Lane:
    # What the pipelines' prepare_extra_step_kwargs passes: eta 0 where the sampler takes it, the generators
    # where it draws noise.
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return Lane(stage, scheduler, timesteps, latents, generators, conditioning, shape.cfg_scale, kwargs)


def stage_conditioning(
    pipe: Any, stage: Stage, shape: RenderShape, tensors: dict[str, torch.Tensor], index: int
) -> StageConditioning:
    """Sample `index`'s rows of a stage's encoded prompts (`prompts.encode`), with the stage's time ids."""
    one = slice(index, index + 1)
    embeds, pooled = tensors["prompt_embeds"][one], tensors["pooled_prompt_embeds"][one]
    size = (shape.height, shape.width)
    dim = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    if stage is Stage.BASE:
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=dim)
        negative_ids = ids
    else:
        ids, negative_ids = pipe._get_add_time_ids(
            size, (0, 0), size, shape.scores.positive, shape.scores.negative, size, (0, 0), size,
            dtype=embeds.dtype, text_encoder_projection_dim=dim,
        )  # fmt: skip
    if shape.cfg_scale <= 1.0:
        return StageConditioning(embeds, pooled, ids)
    negative, negative_pooled = tensors["negative_prompt_embeds"][one], tensors["negative_pooled_prompt_embeds"][one]
    return StageConditioning(
        torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled]), torch.cat([negative_ids, ids])
    )


def unet_noise(unet: Any, lanes: list[Lane]) -> list[torch.Tensor]:
    """One UNet call for every lane (each at its own timestep); each lane's rows of the output, in order."""
    inputs = [lane.model_input() for lane in lanes]
    rows = [x.shape[0] for x in inputs]
    device = inputs[0].device
    timesteps = torch.cat([lane.timestep.reshape(1).to(device).expand(n) for lane, n in zip(lanes, rows, strict=True)])
    noise = unet(
        torch.cat(inputs),
        timesteps,
        encoder_hidden_states=torch.cat([lane.conditioning.embeds for lane in lanes]).to(device),
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs={
            "text_embeds": torch.cat([lane.conditioning.text_embeds for lane in lanes]).to(device),
            "time_ids": torch.cat([lane.conditioning.time_ids for lane in lanes]).to(device),
        },
        return_dict=False,
    )[0]
    return list(noise.split(rows))


def decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """Latents to PIL images exactly as the SDXL pipelines' own tail does (upcast VAE, latent mean/std)."""
    vae = pipe.vae
    needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
    if needs_upcasting:
        pipe.upcast_vae()
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        latents = latents / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False)[0]
    if needs_upcasting:
        vae.to(dtype=torch.float16)
    images: list[Any] = pipe.image_processor.postprocess(image, output_type="pil")
    return images
