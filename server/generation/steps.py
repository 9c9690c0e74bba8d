"""What happens at a step boundary: the step's numbers as the stream reports them, the stage clock, and the
callback diffusers calls after every step (interrupting the base at the hand-off, offering compare's copy).

Numbering (see Progress in the proto): a pipeline call's step `i` is 0-based within the timesteps it runs; with an
image, that call starts at `shape.start_index` of the steps-long grid, so grid step = start_index + i + 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from server.core.domain import Branch, RenderShape, Stage


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


class Clock:
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


# Called with the grid step (1-based) just finished and the pipeline's callback tensors: compare's hand-off copy.
Offer = Callable[[int, dict[str, Any]], None]


def step_callback(
    stage: Stage,
    shape: RenderShape,
    observer: StepObserver,
    clock: Clock,
    stop_after: int | None,
    offer: Offer | None = None,
) -> Any:
    """diffusers' `callback_on_step_end` for one stage's pipeline call. `stop_after` counts the call's own steps."""
    first = 0 if stage is Stage.REFINER else shape.start_index  # the grid index this call's step 0 is

    def on_step_end(pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        clock.mark()
        if stop_after is not None and i + 1 >= stop_after:
            pipe._interrupt = True  # diffusers skips the remaining iterations; the latent is returned as is
        if offer is not None:
            offer(first + i + 1, tensors)
        observer.on_step(step_state(stage, i, shape, tensors["latents"], latent_scale(pipe.scheduler)))
        return tensors

    return on_step_end


def step_state(stage: Stage, i: int, shape: RenderShape, latents: torch.Tensor, scale: float) -> StepState:
    """How the stream numbers step `i` (0-based in its pipeline call): see Progress in the proto."""
    if stage is Stage.REFINER:
        # With compare the base-only branch's steps ran before the refiner's: overall steps count both.
        offset = shape.steps_run if shape.compare else shape.base_steps_run
        step, stage_steps, overall, branch = i + 1, shape.refiner_steps, offset + i + 1, Branch.MAIN
    elif i < shape.base_steps_run or not shape.refiner_steps:
        step, stage_steps, overall, branch = i + 1, shape.base_steps_run, i + 1, Branch.MAIN
    else:  # compare: past the hand-off, the base runs on for its own image, every step that runs
        step, stage_steps, overall, branch = i + 1, shape.steps_run, i + 1, Branch.BASE_ONLY
    return StepState(stage, step, stage_steps, overall, shape.total_steps, latents, scale, branch)


def latent_scale(scheduler: Any) -> float:
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) <= 1.0:
        return 1.0
    index = scheduler.step_index  # already advanced: the sigma of the latent just produced
    sigma = float(scheduler.sigmas[min(index, len(scheduler.sigmas) - 1)])
    return math.sqrt(1.0 + sigma * sigma)
