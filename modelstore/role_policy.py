"""What each `Role` accepts, and the one refusal when a model cannot serve its role; what a LoRA must be to
adapt a stage.

Beside `role.py` rather than in it: the errors name roles, so `role.py` depends on nothing, and this policy
needs the errors and the architectures."""

from __future__ import annotations

from modelstore.errors import NotALora, WrongArchitecture
from modelstore.record import Architecture, ModelRecord
from modelstore.role import Role

__all__ = ["ROLE_ARCHITECTURES", "require_architecture", "require_lora", "require_role"]

# Any SDXL model can continue a latent as refiner (diffusers' own mixture-of-denoisers example uses the base for
# both), but only a base can start from noise.
ROLE_ARCHITECTURES = {
    Role.BASE: (Architecture.SDXL_BASE,),
    Role.REFINER: (Architecture.SDXL_REFINER, Architecture.SDXL_BASE),
}


def require_role(record: ModelRecord, role: Role) -> None:
    """Raise WrongArchitecture unless `record` can serve as `role` (a LoRA never can: it is no model)."""
    if record.is_lora:
        raise WrongArchitecture(
            f"{record.canonical} is a LoRA ({_lora_label(record.architecture)}), not a checkpoint; the {role} must "
            "be a checkpoint",
            expected="a checkpoint",
            found="a LoRA",
            role=role,
            air=record.canonical,
        )
    require_architecture(record.architecture, role, name=record.canonical, air=record.canonical)


def require_architecture(architecture: Architecture, role: Role, *, name: str, air: str | None = None) -> None:
    """Raise WrongArchitecture, naming the model `name` (and `air` if it has one), unless weights of
    `architecture` can serve as `role`."""
    allowed = ROLE_ARCHITECTURES[role]
    if architecture not in allowed:
        expected = " or ".join(a.label for a in allowed)
        raise WrongArchitecture(
            f"{name} is {architecture.label}; the {role} must be {expected}",
            expected=expected,
            found=architecture.label,
            role=role,
            air=air,
        )


def require_lora(record: ModelRecord, fits: Architecture, *, field: str) -> None:
    """Raise unless `record` is a LoRA that adapts a model of architecture `fits` (the UNet of the stage it is
    for: `SDXL_BASE` or `SDXL_REFINER`): NotALora for a checkpoint, WrongArchitecture for a LoRA trained on
    anything else (SD 1.5, FLUX, an unrecognised model, or the other SDXL UNet, whose widths differ). Both
    name the request's `field`."""
    if not record.is_lora:
        raise NotALora(
            f"{record.canonical} is a checkpoint ({record.architecture.label}), not a LoRA",
            found="a checkpoint",
            field=field,
            air=record.canonical,
        )
    if record.architecture is not fits:
        raise WrongArchitecture(
            f"{record.canonical} is a LoRA {_lora_label(record.architecture)}; this stage needs a LoRA for "
            f"{fits.label}",
            expected=f"a LoRA for {fits.label}",
            found=f"a LoRA {_lora_label(record.architecture)}",
            role=Role.LORA,
            air=record.canonical,
            field=field,
        )


def _lora_label(architecture: Architecture) -> str:
    if architecture is Architecture.UNKNOWN:
        return "for an unrecognised model"
    return f"for {architecture.label}"
