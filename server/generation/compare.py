"""Compare: the refined image and the image the base makes alone, from one base run (issue 11).

How both images stay exact:

- **The base-only image is the uninterrupted base run.** With compare the base is not stopped at the hand-off:
  it runs all `steps` with the same arguments, scheduler, generators and decode as a request without a
  refiner, so its image is that request's image by construction. Its sampler state (DPM++ / UniPC history,
  step index, lower-order counters) never leaves the scheduler that built it; nothing is resumed, so nothing
  has to be reconstructed.
- **The refined branch starts from a copy of the hand-off.** The base's step callback, at step `base_steps`,
  copies the latent and the state of every random generator (`Handoff`). The refiner then runs exactly as it
  does without compare: a fresh scheduler started at index `base_steps` (a request without compare gives the
  refiner a fresh scheduler too, so forking the base's multistep history into it would make the images
  *differ*), that latent, and generators in the state the base left them at the hand-off (an ancestral
  sampler's noise continues where the base stopped, not where the base-only branch went on to).

Order and cost: the base's shared steps, its `refiner_steps` further steps and its decode, then the refiner's
steps and decode: `steps + refiner_steps` UNet steps where two requests take `2 * steps`. The copy costs one
latent per image (128 KiB at 1024x1024 in fp16) and a few KiB of generator state; nothing else is held, since
the base-only images are decoded before the refiner starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Handoff:
    """The latent and the generators' state at the end of base step `at_step` (1-based), copied."""

    def __init__(self, at_step: int, generators: Sequence[torch.Generator]) -> None:
        self.at_step = at_step
        self._generators = list(generators)
        self._latents: torch.Tensor | None = None
        self._states: list[torch.Tensor] = []

    def offer(self, step: int, tensors: dict[str, Any]) -> None:
        """Called after every base step (`step` on the grid, 1-based) with the pipeline's callback tensors;
        keeps a copy of the hand-off's latent."""
        if step != self.at_step:
            return
        latents = self.handoff_latents(tensors)
        # The base goes on with these very tensors and generators, so copy them; the scheduler returns a new
        # latent each step, but a copy costs nothing and does not depend on that.
        self._latents = latents.detach().clone()
        self._states = [g.get_state() for g in self._generators]

    def handoff_latents(self, tensors: dict[str, Any]) -> torch.Tensor:
        """The latent a base stopped at this step would have returned: the step's own (inpainting overrides)."""
        latents: torch.Tensor = tensors["latents"]
        return latents

    @property
    def latents(self) -> torch.Tensor:
        if self._latents is None:
            raise RuntimeError(f"the base never reached the hand-off at step {self.at_step}")
        return self._latents

    def generators(self) -> list[torch.Generator]:
        """New generators, each in the state its original had at the hand-off."""
        if self._latents is None:
            raise RuntimeError(f"the base never reached the hand-off at step {self.at_step}")
        copies = []
        for original, state in zip(self._generators, self._states, strict=True):
            copy = torch.Generator(device=original.device)
            copy.set_state(state)
            copies.append(copy)
        return copies
