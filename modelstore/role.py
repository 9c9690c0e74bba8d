"""A model's role in a pair: on its own so that the errors, which name roles, depend on nothing else."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """What a model does in a pair: the base denoises from noise, the refiner continues the base's latent.

    A `StrEnum`, so the role reads as "base" / "refiner" in logs, memos and diffusers' own vocabulary."""

    BASE = "base"
    REFINER = "refiner"
    LORA = "lora"  # a LoRA of either stage: only ever reported (downloads, loading), never a pair's model
