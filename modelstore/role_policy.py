"""What each `Role` accepts, and the one refusal when a model cannot serve its role.

Beside `role.py` rather than in it: the errors name roles, so `role.py` depends on nothing, and this policy
needs the errors and the architectures."""

from __future__ import annotations

from modelstore.errors import WrongArchitecture
from modelstore.record import Architecture, ModelRecord
from modelstore.role import Role

__all__ = ["ROLE_ARCHITECTURES", "require_architecture", "require_role"]

# Any SDXL model can continue a latent as refiner (diffusers' own mixture-of-denoisers example uses the base for
# both), but only a base can start from noise.
ROLE_ARCHITECTURES = {
    Role.BASE: (Architecture.SDXL_BASE,),
    Role.REFINER: (Architecture.SDXL_REFINER, Architecture.SDXL_BASE),
}


def require_role(record: ModelRecord, role: Role) -> None:
    """Raise WrongArchitecture unless `record` can serve as `role`."""
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
