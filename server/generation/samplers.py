"""The offered samplers, as diffusers scheduler classes plus the config changes that make each one.

Each stage gets a fresh instance built from the *base* model's scheduler config, so both stages walk the same
timestep grid (shared/research/diffusers.md §1.2) and no scheduler state is shared between jobs. Every
scheduler offered here is first order (one timestep entry per step), which is what makes the index split in
`server/generation/runner.py` exact; order-2 samplers (Heun, DPM2) would need the technique in diffusers.md §1.3.
"""

from __future__ import annotations

from typing import Any

from server.core.domain import Sampler


def _classes() -> dict[Sampler, tuple[Any, dict[str, Any]]]:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    dpmpp_2m = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}
    return {
        Sampler.EULER: (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
        Sampler.EULER_ANCESTRAL: (EulerAncestralDiscreteScheduler, {}),
        Sampler.DDIM: (DDIMScheduler, {}),
        Sampler.DPMPP_2M: (DPMSolverMultistepScheduler, dpmpp_2m),
        Sampler.DPMPP_2M_KARRAS: (DPMSolverMultistepScheduler, {**dpmpp_2m, "use_karras_sigmas": True}),
        Sampler.UNIPC: (UniPCMultistepScheduler, {}),
    }


def make_scheduler(kind: Sampler, base_config: Any) -> Any:
    """A fresh scheduler of `kind` on the base model's noise schedule (betas, spacing, prediction type)."""
    cls, overrides = _classes()[kind]
    scheduler = cls.from_config(base_config, **overrides)
    if scheduler.order != 1:  # pragma: no cover - guards the table above against a future edit
        raise AssertionError(f"{cls.__name__} is not first order; the index split would be wrong")
    return scheduler
