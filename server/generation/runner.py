"""The exact two-stage runner: the base denoises steps 1..k, the refiner continues from that latent.

How the split is made exact (shared/research/diffusers.md §1.2-1.4):

- Both stages get fresh schedulers of the same class and the base model's config, the same
  `num_inference_steps`, and the same list of `torch.Generator`s, so they walk one timestep grid and an
  ancestral sampler's noise continues where the base left it.
- The base runs the full grid and is interrupted after exactly `k` steps (`pipe._interrupt`, set from the step
  callback, is diffusers' documented early stop); it returns the latent, undecoded.
- The refiner receives that latent (4 channels: diffusers skips the VAE encode) with a `denoising_start`, which
  also stops diffusers from adding noise, and starts at index `k` of the grid. diffusers would derive the start
  from an integer-timestep cutoff instead; on DPM++ 2M Karras grids from 45 steps up, neighbouring timesteps
  share an integer and no cutoff can split there, so the refiner runs on `indexed.py`'s pipeline, which takes
  the index directly.
  Wherever a cutoff exists, both give the same slice (tests/integration/test_generate.py proves the images
  equal diffusers' own `denoising_end` / `denoising_start` run by hand).
- With compare, the base is not interrupted: it runs to the end for the base-only image, and the refiner starts
  from a copy of the hand-off (`server/generation/compare.py` says why both images stay exact).
- The refiner's aesthetic scores and prompts reach diffusers as it defines them: `aesthetic_score` /
  `negative_aesthetic_score` of the img2img call, and the refiner's own `encode_prompt`.

Only this room (`server/generation/`) and the model store's loader talk to diffusers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionXLPipeline

from server.core.domain import ImageMode, RenderShape, Sample, Stage
from server.generation import from_image, indexed, loras, prompts
from server.generation.compare import Handoff
from server.generation.pipelines import PipelinePair
from server.generation.results import PipelineRunner, RunResult, StageTimings
from server.generation.samplers import make_scheduler
from server.generation.steps import Clock, StepObserver, StepState, step_callback

__all__ = ["PipelineRunner", "RunResult", "StageTimings", "StepObserver", "StepState", "native_size", "run"]


def native_size(base: StableDiffusionXLPipeline) -> tuple[int, int]:
    """The base model's training resolution (1024x1024 for SDXL), as (width, height)."""
    side = int(base.unet.config.sample_size) * int(base.vae_scale_factor)
    return side, side


def run(pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver) -> RunResult:
    """Denoise `samples` as one batch; returns one RGB image per sample, in order."""
    model_scheduler = pair.base.scheduler
    try:
        if shape.mode is not ImageMode.TEXT:  # its own module: the seed images, their stages and paste-back
            return from_image.run(pair, shape, samples, observer)
        return _run(pair, shape, samples, observer)
    finally:
        # Each job's schedulers are built from the model's own scheduler config. Left in place, this job's
        # scheduler (and its config: Karras sigmas, solver settings) would be the next job's starting point.
        pair.base.scheduler = model_scheduler


def _run(pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver) -> RunResult:
    if shape.refiner_steps and pair.refiner is None:
        raise ValueError("the shape has refiner steps but no refiner was loaded")
    base = pair.base
    device = base._execution_device
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
    use_cfg = shape.cfg_scale > 1.0
    clock = Clock(device)
    # Only a refined request without compare stops the base at the hand-off; otherwise it runs to the end.
    stop = shape.base_steps if shape.refiner_steps and not shape.compare else None
    handoff = Handoff(shape.base_steps, generators) if shape.compare else None

    base.scheduler = make_scheduler(shape.sampler, base.scheduler.config)
    loras.apply(base, pair.loras.base)  # before the prompts: a LoRA may have text-encoder parts
    conditioning = prompts.encode(base, samples, Stage.BASE, device, use_cfg, chunks=shape.chunks)
    base_result = base(
        **conditioning.tensors,
        width=shape.width,
        height=shape.height,
        num_inference_steps=shape.steps,
        guidance_scale=shape.cfg_scale,
        generator=generators,
        output_type="pil" if stop is None else "latent",
        callback_on_step_end=step_callback(
            Stage.BASE, shape, observer, clock, stop_after=stop, offer=handoff.offer if handoff else None
        ),
        callback_on_step_end_tensor_inputs=["latents"],
    )
    base_end = clock.last_step
    timings = StageTimings(base_s=clock.seconds(clock.start, base_end))
    if stop is None:  # the base decoded its own images
        timings.decode_s = clock.seconds(base_end, clock.mark())
    if not shape.refiner_steps:
        return RunResult(list(base_result.images), timings, tokens=list(conditioning.tokens))
    if handoff is None:
        result = _refine(pair, shape, samples, base_result.images, generators, observer, clock, timings)
    else:
        result = _refine(pair, shape, samples, handoff.latents, handoff.generators(), observer, clock, timings)
        result.base_only = list(base_result.images)
    result.tokens = [b + r for b, r in zip(conditioning.tokens, result.tokens, strict=True)]
    return result


def _refine(
    pair: PipelinePair,
    shape: RenderShape,
    samples: Sequence[Sample],
    latents: torch.Tensor,
    generators: list[torch.Generator],
    observer: StepObserver,
    clock: Clock,
    timings: StageTimings,
) -> RunResult:
    """The refiner from the base's latent at the hand-off, with the generators in their state there."""
    base = pair.base
    assert pair.refiner is not None
    loras.apply(pair.refiner, pair.loras.refiner)
    refiner = indexed.img2img(pair.refiner, start_index=shape.base_steps)
    refiner.scheduler = make_scheduler(shape.sampler, base.scheduler.config)
    device = base._execution_device
    conditioning = prompts.encode(
        refiner, samples, Stage.REFINER, device, shape.cfg_scale > 1.0, chunks=shape.refiner_chunks
    )
    refiner_start = clock.mark()
    refined = refiner(
        **conditioning.tensors,
        image=latents,
        num_inference_steps=shape.steps,
        # Any valid fraction: it only switches diffusers to the no-noise start; the index decides where.
        denoising_start=shape.base_steps / shape.steps,
        guidance_scale=shape.cfg_scale,
        aesthetic_score=shape.scores.positive,
        negative_aesthetic_score=shape.scores.negative,
        generator=generators,
        output_type="pil",
        callback_on_step_end=step_callback(Stage.REFINER, shape, observer, clock, stop_after=None),
        callback_on_step_end_tensor_inputs=["latents"],
    )
    refiner_end = clock.last_step
    timings.refiner_s = clock.seconds(refiner_start, refiner_end)
    timings.decode_s += clock.seconds(refiner_end, clock.mark())
    return RunResult(list(refined.images), timings, tokens=list(conditioning.tokens))
