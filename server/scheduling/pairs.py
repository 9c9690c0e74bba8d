"""A pair once resolved: each model's cached record, its role and its components (sizes and fingerprints), which
is what placement budgets with and residency loads."""

from __future__ import annotations

from dataclasses import dataclass

from modelstore import Component, ModelRecord, Role
from server.core.domain import PairKey


@dataclass(frozen=True)
class ModelSpec:
    record: ModelRecord
    role: Role
    components: tuple[Component, ...]

    @property
    def key(self) -> tuple[str, Role]:
        return (self.record.canonical, self.role)


@dataclass(frozen=True)
class PairSpec:
    key: PairKey
    base: ModelSpec
    refiner: ModelSpec | None

    def models(self) -> list[ModelSpec]:
        return [self.base] if self.refiner is None else [self.base, self.refiner]
