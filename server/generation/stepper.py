"""Step-level batching: requests join a running batch at any step boundary and leave when done (issue 19).

The device's worker owns one `Stepper` per pair it runs. Every `tick()` advances every active lane one step:

- **One sub-batch per UNet.** The base's lanes share one base-UNet call and the refiner's lanes one refiner-UNet
  call, base first; each lane at its own timestep, with its own guidance, conditioning and sampler state
  (`lanes.py`). A tick therefore costs at most two UNet calls whatever the mix, and no lane ever waits a step.
- **What must match to share a call**: the pair and its LoRAs (a UNet computes with one adapter set), the image
  size and each stage's text windows (tensors are concatenated). The scheduler only lets requests join that match
  (`join_key`); steps, sampler, guidance, refiner start, compare and seeds may all differ.
- **A request's own order is kept**: its base steps, then (compare) its base-only steps, then its refiner's, as
  the static runner reports them; a compare request's refiner lanes start once its base-only branch has finished,
  so its events come in the documented order while other requests fill the tick.
- **Decodes off the step loop**: a finished branch's latents go to a decoder thread (`decode`), so the next tick
  runs while the VAE works; `collect()` returns what has finished.

Exactness: a lane is the state diffusers' SDXL loop keeps for one image, built with diffusers' own methods, so a
request's image equals the static runner's within the rounding a different batch composition gives (the same
tolerance as batching today; tests/integration/test_continuous.py).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from server.core.domain import RenderShape, Sample, Stage
from server.generation import lanes as lane_ops
from server.generation import loras, prompts
from server.generation.lanes import Lane, StageConditioning
from server.generation.pipelines import PipelinePair
from server.generation.results import RunResult, StageTimings
from server.generation.steps import StepObserver, latent_scale, step_state


@dataclass
class _Member:
    """One request in the stepper: its lanes by stage, and what it has produced so far."""

    key: Hashable
    shape: RenderShape
    samples: Sequence[Sample]
    observer: StepObserver
    refiner_conditioning: list[StageConditioning]
    base: list[Lane]
    refiner: list[Lane] = field(default_factory=list)
    pending: list[Lane] = field(default_factory=list)  # compare: the refiner's lanes, after the base-only branch
    tokens: list[tuple[Any, ...]] = field(default_factory=list)
    base_only: concurrent.futures.Future[tuple[list[Image.Image], float]] | None = None
    refined: concurrent.futures.Future[tuple[list[Image.Image], float]] | None = None
    timings: StageTimings = field(default_factory=StageTimings)

    def active(self, stage: Stage) -> list[Lane]:
        return self.base if stage is Stage.BASE else self.refiner


@dataclass(frozen=True)
class Finished:
    """A request whose images are decoded: its key and its result (as the static runner returns it)."""

    key: Hashable
    result: RunResult


class Stepper:
    """The requests running on one pair of one device, stepped together. Not thread-safe: the worker's thread only."""

    def __init__(self, pair: PipelinePair, decoder: concurrent.futures.Executor) -> None:
        self.pair = pair
        self._decoder = decoder
        self._device = pair.base._execution_device
        self._members: dict[Hashable, _Member] = {}
        self._decoding: dict[Hashable, _Member] = {}  # every lane done, images on their way

    @property
    def images(self) -> int:
        """Images in flight: the lanes that still step or wait to (what bounds the device's memory)."""
        return sum(len(m.samples) for m in self._members.values())

    def __bool__(self) -> bool:
        return bool(self._members or self._decoding)

    def admit(self, key: Hashable, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver) -> None:
        """Add a request: its prompts encoded for both stages, its base lanes ready for the next tick."""
        pair, use_cfg = self.pair, shape.cfg_scale > 1.0
        with torch.no_grad():
            loras.apply(pair.base, pair.loras.base)
            base = prompts.encode(pair.base, samples, Stage.BASE, self._device, use_cfg, chunks=shape.chunks)
            refined: prompts.Conditioning | None = None
            if shape.refiner_steps:
                assert pair.refiner is not None, "a refined request on a pair without a refiner"
                loras.apply(pair.refiner, pair.loras.refiner)
                refined = prompts.encode(
                    pair.refiner, samples, Stage.REFINER, self._device, use_cfg, chunks=shape.refiner_chunks
                )
            lanes = [
                lane_ops.base_lane(
                    pair.base,
                    shape,
                    torch.Generator("cpu").manual_seed(sample.seed),
                    lane_ops.stage_conditioning(pair.base, Stage.BASE, shape, base.tensors, i),
                    self._device,
                )
                for i, sample in enumerate(samples)
            ]
        refiner_rows = []
        tokens = list(base.tokens)
        if refined is not None:
            assert pair.refiner is not None
            refiner_rows = [
                lane_ops.stage_conditioning(pair.refiner, Stage.REFINER, shape, refined.tensors, i)
                for i in range(len(samples))
            ]
            tokens = [b + r for b, r in zip(base.tokens, refined.tokens, strict=True)]
        self._members[key] = _Member(key, shape, samples, observer, refiner_rows, lanes, tokens=tokens)

    def drop(self, key: Hashable) -> None:
        """Forget a request (cancelled, past its deadline): its lanes leave before the next tick."""
        self._members.pop(key, None)
        self._decoding.pop(key, None)

    def tick(self) -> dict[Stage, float]:
        """Advance every active lane one step: one call per UNet, then each request's own bookkeeping. Returns
        the seconds each stage's call took."""
        members = list(self._members.values())
        took: dict[Stage, float] = {}
        with torch.no_grad():
            for stage, unet in ((Stage.BASE, self.pair.base.unet), (Stage.REFINER, self._refiner_unet())):
                stepping = [(m, lane) for m in members for lane in m.active(stage)]
                if not stepping:
                    continue
                started = time.perf_counter()
                noise = lane_ops.unet_noise(unet, [lane for _, lane in stepping])
                for (_, lane), rows in zip(stepping, noise, strict=True):
                    lane.step(rows)
                seconds = took[stage] = time.perf_counter() - started
                for member in {id(m): m for m, _ in stepping}.values():
                    self._after_step(member, stage, seconds)
        return took

    def collect(self, *, wait: bool = False) -> list[Finished]:
        """The requests whose images are decoded (with `wait`, once every decode in flight has ended)."""
        finished = []
        for key, member in list(self._decoding.items()):
            futures = [f for f in (member.base_only, member.refined) if f is not None]
            if wait:
                concurrent.futures.wait(futures)
            if all(f.done() for f in futures):
                del self._decoding[key]
                finished.append(Finished(key, self._result(member)))
        return finished

    # ---- inside a tick ---------------------------------------------------------------------------------

    def _refiner_unet(self) -> Any:
        return self.pair.refiner.unet if self.pair.refiner is not None else None

    def _after_step(self, member: _Member, stage: Stage, seconds: float) -> None:
        """Report the step, then move the request on: hand-off, compare's fork, decode, done."""
        lanes = member.active(stage)
        shape = member.shape
        if stage is Stage.BASE:
            member.timings.base_s += seconds
        else:
            member.timings.refiner_s += seconds
        latents = torch.cat([lane.latents for lane in lanes])
        member.observer.on_step(step_state(stage, lanes[0].done - 1, shape, latents, latent_scale(lanes[0].scheduler)))
        if stage is Stage.BASE and shape.compare and lanes[0].done == shape.base_steps:
            member.pending = [self._handoff(member, i, lane, copy=True) for i, lane in enumerate(lanes)]
        if not lanes[0].finished:
            return
        if stage is Stage.REFINER or not shape.refiner_steps:
            member.refined = self._decode(self.pair.refiner if stage is Stage.REFINER else self.pair.base, latents)
            self._done(member)
        elif shape.compare:  # the base-only branch is done: decode it, and the refiner's lanes start
            member.base_only = self._decode(self.pair.base, latents)
            member.base, member.refiner, member.pending = [], member.pending, []
        else:
            member.base, member.refiner = [], [self._handoff(member, i, lane) for i, lane in enumerate(lanes)]

    def _handoff(self, member: _Member, index: int, lane: Lane, *, copy: bool = False) -> Lane:
        latents, generators = lane.latents, lane.generators
        if copy:  # compare: the base goes on with its own tensors and generators
            latents = latents.detach().clone()
            generators = [_copied(g) for g in generators]
        config = self.pair.base.scheduler.config
        return lane_ops.refiner_lane(config, member.shape, latents, generators, member.refiner_conditioning[index])

    def _decode(self, pipe: Any, latents: torch.Tensor) -> concurrent.futures.Future[tuple[list[Image.Image], float]]:
        return self._decoder.submit(_timed_decode, pipe, latents)

    def _done(self, member: _Member) -> None:
        member.base, member.refiner = [], []
        del self._members[member.key]
        self._decoding[member.key] = member

    def _result(self, member: _Member) -> RunResult:
        assert member.refined is not None
        images, decode_s = member.refined.result()
        member.timings.decode_s += decode_s
        base_only: list[Image.Image] = []
        if member.base_only is not None:
            base_only, seconds = member.base_only.result()
            member.timings.decode_s += seconds
        return RunResult(images, member.timings, base_only, member.tokens)


def _timed_decode(pipe: Any, latents: torch.Tensor) -> tuple[list[Image.Image], float]:
    started = time.perf_counter()
    images = lane_ops.decode(pipe, latents)
    return images, time.perf_counter() - started


def _copied(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def join_key(shape: RenderShape) -> Hashable:
    """What requests on one pair must share to step together: image size, text windows per stage, LoRAs (the
    pair's LoRA set is one per stepper) and text-to-image (requests from an image run in static batches)."""
    return (shape.width, shape.height, shape.chunks, shape.refiner_chunks, shape.loras, shape.refiner_loras)
