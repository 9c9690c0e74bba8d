"""Runs that start from an image: img2img, inpainting (4- and 9-channel bases) and refine-only, on the request's
exact step grid (`server/generation/split.py` does the arithmetic; `indexed.py` slices the grid).

On the N-step grid a request with an image starts at index `k = shape.start_index`; the hand-off stays at
`b = shape.base_steps`, where the request's refiner start puts it:

- **Base, then refiner**: the base runs grid indexes `k..b-1` from the seed image (VAE-encoded and noised to
  index `k` by diffusers, from the request's generators), the refiner `b..N-1` from the base's latent with no
  noise added and the same generators: the hand-run with `strength` and `denoising_end` / `denoising_start`.
- **Refine-only** (`b <= k`): the refiner runs `k..N-1` from the seed image, as diffusers' refiner img2img with
  `strength` does (SDEdit with the refiner, as the SDXL paper uses it).
- **Inpainting**: the same stages on diffusers' inpaint pipeline, the mask passed to both, so the masked latent
  is blended back after every step of both stages; the decoded result is pasted over the original outside the
  mask (`image_inputs.py`).
- **Compare**: the base runs `k..N-1` for its own image, and the refined branch starts from a copy of the
  hand-off (`compare.py`). When inpainting with a 4-channel base, the copy is the latent a base stopped at the
  hand-off would have returned: a stopped base blends the *clean* image latents back on its last step where the
  running one blends them noised to the next timestep, so the copy takes the clean ones outside the mask
  (binary at latent resolution, so the copy is exact). Refine-only compare: the base-only image is the base's
  own img2img over the same steps, each branch from fresh generators (each equals its request alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from server.core.domain import ImageMode, RenderShape, Sample, Stage
from server.generation import indexed, loras, prompts
from server.generation.compare import Handoff
from server.generation.image_inputs import PreparedSeed, paste_back, prepare
from server.generation.pipelines import PipelinePair
from server.generation.results import RunResult, StageTimings
from server.generation.samplers import make_scheduler
from server.generation.steps import Clock, Offer, StepObserver, step_callback


class _Run:
    """One batch from seed images: the stages it runs, sharing its clock, timings and observer."""

    def __init__(self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver):
        if shape.refiner_steps and pair.refiner is None:
            raise ValueError("the shape has refiner steps but no refiner was loaded")
        if any(s.seed_image is None for s in samples):
            raise ValueError("a sample of an image batch has no seed image")
        self.pair, self.shape, self.samples, self.observer = pair, shape, samples, observer
        self.inpainting = shape.mode is ImageMode.INPAINT
        self.device = pair.base._execution_device
        self.clock = Clock(self.device)
        self.timings = StageTimings()
        self.seeds: list[PreparedSeed] = []

    def generators(self) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(s.seed) for s in self.samples]

    def stage_pipe(self, stage: Stage, start: int, end: int | None) -> Any:
        source = self.pair.base if stage is Stage.BASE else self.pair.refiner
        pipe = indexed.inpaint(source, start, end) if self.inpainting else indexed.img2img(source, start, end)
        pipe.scheduler = make_scheduler(self.shape.sampler, self.pair.base.scheduler.config)
        if not self.seeds:  # the same for every stage: the processors of the base and refiner agree
            mask_processor = getattr(pipe, "mask_processor", pipe.image_processor)
            self.seeds = [
                prepare(s.seed_image, self.shape.width, self.shape.height, pipe.image_processor, mask_processor)
                for s in self.samples
                if s.seed_image is not None
            ]
        return pipe

    def call(
        self,
        pipe: Any,
        stage: Stage,
        generators: list[torch.Generator],
        *,
        latents: torch.Tensor | None = None,
        decode: bool = True,
        offer: Offer | None = None,
    ) -> tuple[Any, prompts.Conditioning]:
        """Run one stage: from the seed images (noised at the slice's first index) or, given `latents`, from a
        hand-off (no noise added)."""
        shape, source = self.shape, (self.pair.base if stage is Stage.BASE else self.pair.refiner)
        loras.apply(source, self.pair.loras.base if stage is Stage.BASE else self.pair.loras.refiner)
        use_cfg = shape.cfg_scale > 1.0
        chunks = shape.chunks if stage is Stage.BASE else shape.refiner_chunks
        conditioning = prompts.encode(source, self.samples, stage, self.device, use_cfg, chunks=chunks)
        kwargs: dict[str, Any] = dict(conditioning.tensors)
        if latents is None:
            kwargs.update(image=[s.image for s in self.seeds], strength=shape.steps_run / shape.steps)
        else:  # any valid fraction: it only switches diffusers to the no-noise start; the index decides where
            kwargs.update(image=latents, denoising_start=shape.base_steps / shape.steps)
        if self.inpainting:
            kwargs.update(mask_image=[s.mask for s in self.seeds], height=shape.height, width=shape.width)
        if stage is Stage.REFINER:
            kwargs.update(aesthetic_score=shape.scores.positive, negative_aesthetic_score=shape.scores.negative)
        callback = step_callback(stage, shape, self.observer, self.clock, stop_after=None, offer=offer)
        output = pipe(
            **kwargs,
            num_inference_steps=shape.steps,
            guidance_scale=shape.cfg_scale,
            generator=generators,
            output_type="pil" if decode else "latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents", "mask"] if offer and self.inpainting else ["latents"],
        )
        return output, conditioning

    def pasted(self, images: Sequence[Image.Image], pipe: Any) -> list[Image.Image]:
        return [paste_back(seed, image, pipe.image_processor) for seed, image in zip(self.seeds, images, strict=True)]


def run(pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver) -> RunResult:
    """Denoise `samples` (each with its seed image) as one batch; one RGB image per sample, in order."""
    batch = _Run(pair, shape, samples, observer)
    if shape.refine_only:
        return _refine_only(batch)
    return _base_then_refiner(batch)


def _base_then_refiner(batch: _Run) -> RunResult:
    shape, clock, timings = batch.shape, batch.clock, batch.timings
    generators = batch.generators()
    stop = shape.base_steps if shape.refiner_steps and not shape.compare else None  # the slice's end index
    base = batch.stage_pipe(Stage.BASE, shape.start_index, stop)
    handoff = _handoff(batch, base, generators) if shape.compare else None
    output, conditioning = batch.call(
        base, Stage.BASE, generators, decode=stop is None, offer=handoff.offer if handoff else None
    )
    base_end = clock.last_step
    timings.base_s = clock.seconds(clock.start, base_end)
    if stop is None:  # the base decoded its own images
        timings.decode_s = clock.seconds(base_end, clock.mark())
    if not shape.refiner_steps:
        return RunResult(batch.pasted(output.images, base), timings, tokens=list(conditioning.tokens))
    if handoff is None:
        latents, continued = output.images, generators
    else:
        latents, continued = handoff.latents, handoff.generators()
    refiner = batch.stage_pipe(Stage.REFINER, shape.base_steps, None)
    refiner_start = clock.mark()
    refined, refiner_conditioning = batch.call(refiner, Stage.REFINER, continued, latents=latents)
    _time_refiner(batch, refiner_start)
    result = RunResult(batch.pasted(refined.images, refiner), timings)
    if handoff is not None:
        result.base_only = batch.pasted(output.images, base)
    result.tokens = [b + r for b, r in zip(conditioning.tokens, refiner_conditioning.tokens, strict=True)]
    return result


def _refine_only(batch: _Run) -> RunResult:
    """The refiner over every step that runs; with compare, first the base's own img2img of the same steps."""
    shape, clock, timings = batch.shape, batch.clock, batch.timings
    base_only: list[Image.Image] = []
    if shape.compare:
        base = batch.stage_pipe(Stage.BASE, shape.start_index, None)
        alone, _ = batch.call(base, Stage.BASE, batch.generators())
        base_only = batch.pasted(alone.images, base)
        timings.base_s = clock.seconds(clock.start, clock.last_step)
        timings.decode_s = clock.seconds(clock.last_step, clock.mark())
    refiner = batch.stage_pipe(Stage.REFINER, shape.start_index, None)
    refiner_start = clock.mark()
    refined, conditioning = batch.call(refiner, Stage.REFINER, batch.generators())
    _time_refiner(batch, refiner_start)
    return RunResult(batch.pasted(refined.images, refiner), timings, base_only, list(conditioning.tokens))


def _time_refiner(batch: _Run, refiner_start: Any) -> None:
    clock = batch.clock
    refiner_end = clock.last_step
    batch.timings.refiner_s = clock.seconds(refiner_start, refiner_end)
    batch.timings.decode_s += clock.seconds(refiner_end, clock.mark())


def _handoff(batch: _Run, base: Any, generators: list[torch.Generator]) -> Handoff:
    if batch.inpainting and base.unet.config.in_channels == 4:
        return _InpaintHandoff(batch.shape.base_steps, generators, base, use_cfg=batch.shape.cfg_scale > 1.0)
    return Handoff(batch.shape.base_steps, generators)


class _InpaintHandoff(Handoff):
    """The hand-off of a 4-channel inpaint base that runs on past it: outside the mask, the clean image latents
    (what a base stopped there blends back on its last step), inside, the step's own latent."""

    def __init__(self, at_step: int, generators: Sequence[torch.Generator], pipe: Any, *, use_cfg: bool) -> None:
        super().__init__(at_step, generators)
        self._pipe, self._use_cfg = pipe, use_cfg

    def handoff_latents(self, tensors: dict[str, Any]) -> torch.Tensor:
        mask: torch.Tensor = tensors["mask"]
        if self._use_cfg:
            mask = mask.chunk(2)[0]
        clean = self._pipe.image_latents
        assert clean is not None, "the inpaint pipeline kept no image latents"
        # diffusers' own blend expression, with the clean latents: where the mask is 0 or 1 this is exact.
        latents: torch.Tensor = (1 - mask) * clean + mask * tensors["latents"]
        return latents
