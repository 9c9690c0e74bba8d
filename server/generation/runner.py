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
  share an integer and no cutoff can split there, so `_IndexedRefinerPipeline` takes the index directly.
  Wherever a cutoff exists, both give the same slice (tests/integration/test_generate.py proves the images
  equal diffusers' own `denoising_end` / `denoising_start` run by hand).
- With compare, the base is not interrupted: it runs to the end for the base-only image, and the refiner starts
  from a copy of the hand-off (`server/generation/compare.py` says why both images stay exact).
- The refiner's aesthetic scores and prompts reach diffusers as it defines them: `aesthetic_score` /
  `negative_aesthetic_score` of the img2img call, and the refiner's own `encode_prompt`.

Only this room (`server/generation/`) and the model store's loader talk to diffusers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image

from server.core.domain import Branch, RenderShape, Sample, Stage, TokenCount
from server.generation import loras, prompts
from server.generation.compare import Handoff
from server.generation.pipelines import PipelinePair
from server.generation.samplers import make_scheduler


class _IndexedRefinerPipeline(StableDiffusionXLImg2ImgPipeline):  # type: ignore[misc]
    """SDXL img2img whose `denoising_start` path begins at an exact index of the timestep grid."""

    start_index: int | None = None

    def get_timesteps(
        self, num_inference_steps: int, strength: float, device: Any, denoising_start: float | None = None
    ) -> tuple[torch.Tensor, int]:
        if denoising_start is None or self.start_index is None:
            return super().get_timesteps(num_inference_steps, strength, device, denoising_start)  # type: ignore[no-any-return]
        start = self.start_index  # first-order schedulers only: one grid entry per step
        timesteps = self.scheduler.timesteps[start:]
        if hasattr(self.scheduler, "set_begin_index"):  # DDIM has no step index to position
            self.scheduler.set_begin_index(start)
        return timesteps, len(timesteps)


@dataclass(frozen=True)
class StepState:
    """What a step callback sees; `latents` is x_t after the step, still on the device."""

    stage: Stage
    step: int  # 1-based within the stage
    stage_steps: int
    overall_step: int
    total_steps: int
    latents: torch.Tensor
    # x_t / latent_scale is variance-preserving (what previews expect): sqrt(1 + sigma^2) for Euler-style
    # schedulers whose latents live in sigma space, 1 for DDIM / DPM++ / UniPC.
    latent_scale: float
    branch: Branch = Branch.MAIN

    def normalized_latents(self) -> torch.Tensor:
        return self.latents / self.latent_scale


class StepObserver(Protocol):
    """Called after every denoising step. Raising (e.g. on cancellation) aborts the run at once."""

    def on_step(self, state: StepState) -> None: ...


@dataclass
class StageTimings:
    base_s: float = 0.0  # with compare, the base-only branch's steps included
    refiner_s: float = 0.0
    decode_s: float = 0.0  # with compare, both decodes


@dataclass
class RunResult:
    images: list[Image.Image]  # one per sample: refined when there is a refiner
    timings: StageTimings = field(default_factory=StageTimings)
    base_only: list[Image.Image] = field(default_factory=list)  # compare: the base's own image per sample
    tokens: list[tuple[TokenCount, ...]] = field(default_factory=list)  # per sample: what each encoder read


class PipelineRunner(Protocol):
    """`run`'s signature; tests substitute runners that fail or wait on purpose."""

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult: ...


def native_size(base: StableDiffusionXLPipeline) -> tuple[int, int]:
    """The base model's training resolution (1024x1024 for SDXL), as (width, height)."""
    side = int(base.unet.config.sample_size) * int(base.vae_scale_factor)
    return side, side


def run(pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver) -> RunResult:
    """Denoise `samples` as one batch; returns one RGB image per sample, in order."""
    model_scheduler = pair.base.scheduler
    try:
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
    clock = _Clock(device)
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
        callback_on_step_end=_callback(Stage.BASE, shape, observer, clock, stop_after=stop, handoff=handoff),
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
    clock: _Clock,
    timings: StageTimings,
) -> RunResult:
    """The refiner from the base's latent at the hand-off, with the generators in their state there."""
    base = pair.base
    assert pair.refiner is not None
    loras.apply(pair.refiner, pair.loras.refiner)
    refiner = _indexed(pair.refiner)
    refiner.scheduler = make_scheduler(shape.sampler, base.scheduler.config)
    refiner.start_index = shape.base_steps
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
        callback_on_step_end=_callback(Stage.REFINER, shape, observer, clock, stop_after=None),
        callback_on_step_end_tensor_inputs=["latents"],
    )
    refiner_end = clock.last_step
    timings.refiner_s = clock.seconds(refiner_start, refiner_end)
    timings.decode_s += clock.seconds(refiner_end, clock.mark())
    return RunResult(list(refined.images), timings, tokens=list(conditioning.tokens))


class _Clock:
    """Stage boundaries. On CUDA the CPU queues kernels ahead of the device, so a CPU clock would count part of
    a stage in the next one (with compiled graphs, most of it): there each boundary is a CUDA event on the
    device's own timeline, read once the images are on the CPU (so every event has completed)."""

    def __init__(self, device: Any) -> None:
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda"
        self.start = self._now()
        self.last_step = self.start

    def _now(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self._device))
            return event
        return time.perf_counter()

    def mark(self) -> Any:
        self.last_step = self._now()
        return self.last_step

    def seconds(self, start: Any, end: Any) -> float:
        if self._cuda:
            end.synchronize()
            return float(start.elapsed_time(end)) / 1000.0
        return float(end - start)


def _indexed(refiner: StableDiffusionXLImg2ImgPipeline | None) -> _IndexedRefinerPipeline:
    """The refiner's components behind the index-start pipeline class (no weights are copied)."""
    assert refiner is not None
    indexed = _IndexedRefinerPipeline(**refiner.components, **_refiner_flags(refiner))
    indexed.set_progress_bar_config(disable=True)
    return indexed


def _refiner_flags(refiner: StableDiffusionXLImg2ImgPipeline) -> dict[str, Any]:
    config = refiner.config
    return {
        "requires_aesthetics_score": bool(config.requires_aesthetics_score),
        "force_zeros_for_empty_prompt": bool(config.force_zeros_for_empty_prompt),
        "add_watermarker": False,
    }


def _callback(
    stage: Stage,
    shape: RenderShape,
    observer: StepObserver,
    clock: _Clock,
    stop_after: int | None,
    handoff: Handoff | None = None,
) -> Any:
    def on_step_end(pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        clock.mark()
        if stop_after is not None and i + 1 >= stop_after:
            pipe._interrupt = True  # diffusers skips the remaining iterations; the latent is returned as is
        if handoff is not None:
            handoff.offer(i + 1, tensors["latents"])
        observer.on_step(_step_state(stage, i, shape, tensors["latents"], _latent_scale(pipe.scheduler)))
        return tensors

    return on_step_end


def _step_state(stage: Stage, i: int, shape: RenderShape, latents: torch.Tensor, scale: float) -> StepState:
    """How the stream numbers step `i` (0-based in its pipeline call): see Progress in the proto."""
    if stage is Stage.REFINER:
        # With compare the base-only branch's steps ran before the refiner's: overall steps count both.
        offset = shape.steps if shape.compare else shape.base_steps
        step, stage_steps, overall, branch = i + 1, shape.refiner_steps, offset + i + 1, Branch.MAIN
    elif i < shape.base_steps:
        step, stage_steps, overall, branch = i + 1, shape.base_steps, i + 1, Branch.MAIN
    else:  # compare: past the hand-off, the base runs on for its own image, every step of the schedule
        step, stage_steps, overall, branch = i + 1, shape.steps, i + 1, Branch.BASE_ONLY
    return StepState(stage, step, stage_steps, overall, shape.total_steps, latents, scale, branch)


def _latent_scale(scheduler: Any) -> float:
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) <= 1.0:
        return 1.0
    index = scheduler.step_index  # already advanced: the sigma of the latent just produced
    sigma = float(scheduler.sigmas[min(index, len(scheduler.sigmas) - 1)])
    return math.sqrt(1.0 + sigma * sigma)
