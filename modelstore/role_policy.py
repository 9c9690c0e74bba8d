"""What each `Role` accepts, and the one refusal when a model cannot serve its role; what a LoRA must be to
adapt a stage.

Beside `role.py` rather than in it: the errors name roles, so `role.py` depends on nothing, and this policy
needs the errors and the architectures."""

from __future__ import annotations

from modelstore.errors import NotALora, WrongArchitecture
from modelstore.record import Architecture, ModelRecord
from modelstore.role import Role

__all__ = ["ROLE_ARCHITECTURES", "needs_mask", "require_architecture", "require_lora", "require_role"]

# Any SDXL model can continue a latent as refiner (diffusers' own mixture-of-denoisers example uses the base for
# both), but only a base can start from noise. An inpainting base starts only from an image and a mask
# (`needs_mask`); it never refines: the refiner stage's UNet reads the latent alone.
ROLE_ARCHITECTURES = {
    Role.BASE: (Architecture.SDXL_BASE, Architecture.SDXL_INPAINT),
    Role.REFINER: (Architecture.SDXL_REFINER, Architecture.SDXL_BASE),
}
# UNets that read a mask and the masked image beside the latent: they run only where a request brings both.
_NEEDS_MASK = frozenset({Architecture.SDXL_INPAINT})
# A LoRA adapts the UNet it was trained on: the inpainting UNet is SDXL base's with a wider input convolution
# (same blocks, same cross-attention widths), so LoRAs for SDXL base fit it, as they do in every SDXL UI.
_LORA_FOR = {Architecture.SDXL_INPAINT: Architecture.SDXL_BASE}


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


def needs_mask(architecture: Architecture) -> bool:
    """Whether a model of `architecture` can only inpaint: its UNet has no input for a request without a mask
    (text-to-image, img2img)."""
    return architecture in _NEEDS_MASK


def require_lora(record: ModelRecord, fits: Architecture, *, field: str) -> None:
    """Raise unless `record` is a LoRA that adapts a model of architecture `fits` (the UNet of the stage it is
    for: `SDXL_BASE`, `SDXL_INPAINT` (whose LoRAs are SDXL base's) or `SDXL_REFINER`): NotALora for a
    checkpoint, WrongArchitecture for a LoRA trained on anything else (SD 1.5, FLUX, an unrecognised model, or
    the other SDXL UNet, whose widths differ). Both name the request's `field`."""
    if not record.is_lora:
        raise NotALora(
            f"{record.canonical} is a checkpoint ({record.architecture.label}), not a LoRA",
            found="a checkpoint",
            field=field,
            air=record.canonical,
        )
    needed = _LORA_FOR.get(fits, fits)
    if record.architecture is not needed:
        raise WrongArchitecture(
            f"{record.canonical} is a LoRA {_lora_label(record.architecture)}; this stage needs a LoRA for "
            f"{needed.label}",
            expected=f"a LoRA for {needed.label}",
            found=f"a LoRA {_lora_label(record.architecture)}",
            role=Role.LORA,
            air=record.canonical,
            field=field,
        )


def _lora_label(architecture: Architecture) -> str:
    if architecture is Architecture.UNKNOWN:
        return "for an unrecognised model"
    return f"for {architecture.label}"
