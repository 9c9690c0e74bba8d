"""Which models live on one device, under a memory budget, and which may be evicted.

The unit of residency is a *pair* (base, refiner): both are loaded together and pinned while a job uses them, so
the base→refiner hand-off never swaps weights, the refiner swap thrash ComfyUI/A1111/InvokeAI users complain of
(shared/research/anchors.md). Underneath, memory is counted per *component* (UNet, VAE, text encoders) by
content fingerprint (modelstore/components.py): a component two models share, like the official refiner's VAE
and OpenCLIP encoder, is loaded once, handed to the second pipeline, and counted once.

Eviction frees least-recently-used pairs that no job uses and no queued job waits for (`protected`), and only
as many as the incoming pair needs. Evicted modules are dropped from every table, then `release_memory` runs
(garbage collection and, on CUDA, `empty_cache`) so the memory really returns to the device.

Only the device's own worker thread loads and evicts; other threads may read (`holds`, `load_cost`) to place
jobs, under a short lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelstore import Role
from modelstore.units import format_bytes
from server.core.domain import PairKey
from server.core.errors import OutOfDeviceMemory
from server.generation import PipelinePair
from server.scheduling.pairs import ModelSpec, PairSpec

log = logging.getLogger(__name__)


class LoadOnDevice(Protocol):
    """Builds a pipeline for `spec` on this residency's device, using the given already-resident modules as its
    components instead of loading them again."""

    def __call__(self, spec: ModelSpec, reuse: Mapping[str, Any]) -> Any: ...


@dataclass
class _Component:
    module: Any
    nbytes: int
    users: set[tuple[str, Role]] = field(default_factory=set)  # model keys


@dataclass
class _Model:
    spec: ModelSpec
    pipeline: Any
    fingerprints: tuple[str, ...]
    pairs: set[PairKey] = field(default_factory=set)


@dataclass
class _Pair:
    spec: PairSpec
    last_used: float
    active: int = 0
    pinned: bool = False


@dataclass(frozen=True)
class ResidentPair:
    key: PairKey
    bytes: int
    active: int
    pinned: bool
    last_used_wall: float  # seconds since the epoch


@dataclass(frozen=True)
class LoadReport:
    """What `acquire` had to do; all zero when the pair was already resident."""

    loaded_bytes: int = 0
    load_s: float = 0.0
    evicted: tuple[PairKey, ...] = ()
    evict_s: float = 0.0


class Residency:
    def __init__(
        self,
        device: str,
        budget_bytes: int,
        *,
        half: bool,
        load: LoadOnDevice,
        release_memory: Callable[[], None] = lambda: None,
        on_unload: Callable[[ModelSpec], None] = lambda _spec: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self.half = half
        self._load = load
        self._release_memory = release_memory
        self._on_unload = on_unload
        self._clock = clock
        self._lock = threading.Lock()
        self._components: dict[str, _Component] = {}
        self._models: dict[tuple[str, Role], _Model] = {}
        self._pairs: dict[PairKey, _Pair] = {}

    # ---- reads (any thread) -----------------------------------------------------------------------------

    def holds(self, key: PairKey) -> bool:
        with self._lock:
            return key in self._pairs

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._components.values())

    def load_cost(self, spec: PairSpec) -> int:
        """Bytes that would have to be loaded for `spec` (0 when resident)."""
        with self._lock:
            return self._missing_bytes(spec)

    def fits(self, spec: PairSpec, protected: set[PairKey]) -> bool:
        """Whether `spec` can be made resident now, evicting only idle, unprotected pairs."""
        with self._lock:
            return self._plan(spec, protected) is not None

    def could_ever_fit(self, spec: PairSpec) -> bool:
        """Whether `spec` fits beside the pinned pairs, which are never evicted (so a request that cannot fit
        is refused at once instead of waiting for room that will never come)."""
        with self._lock:
            pinned = {
                c.fingerprint: c.device_bytes(self.half)
                for p in self._pairs.values()
                if p.pinned
                for m in p.spec.models()
                for c in m.components
            }
            wanted = {c.fingerprint: c.device_bytes(self.half) for m in spec.models() for c in m.components}
            return sum({**pinned, **wanted}.values()) <= self.budget_bytes

    def resident(self) -> list[ResidentPair]:
        with self._lock:
            age = self._clock()
            wall = time.time()
            return [
                ResidentPair(
                    key,
                    self._pair_bytes(pair.spec),
                    pair.active,
                    pair.pinned,
                    wall - (age - pair.last_used),
                )
                for key, pair in self._pairs.items()
            ]

    # ---- the owning worker ------------------------------------------------------------------------------

    def acquire(
        self,
        spec: PairSpec,
        protected: set[PairKey],
        *,
        pin: bool = False,
        on_load: Callable[[ModelSpec, bool], None] = lambda _spec, _done: None,
    ) -> tuple[PipelinePair, LoadReport]:
        """Make `spec` resident (evicting if needed), mark it in use, and return its pipelines.
        `on_load(model, done)` hears about each model that really loads, before (False) and after (True)."""
        with self._lock:
            pair = self._pairs.get(spec.key)
            if pair is not None:
                pair.active += 1
                pair.pinned = pair.pinned or pin
                pair.last_used = self._clock()
                return self._pipelines(spec), LoadReport()
            plan = self._plan(spec, protected)
            if plan is None:
                needed = self._unique_bytes(spec)
                raise OutOfDeviceMemory(
                    f"{spec.key} needs {format_bytes(needed)} on {self.device}; "
                    f"the budget is {format_bytes(self.budget_bytes)} and the rest is in use"
                )
        # Components the incoming pair shares with an evicted one stay resident and are handed over.
        keep = {c.fingerprint for m in spec.models() for c in m.components}
        evict_start = self._clock()
        for key in plan:
            self._evict(key, keep)
        evict_s = self._clock() - evict_start if plan else 0.0
        load_start = self._clock()
        loaded = 0
        try:
            for model in spec.models():
                loaded += self._load_model(model, on_load)
        except BaseException:
            self._forget_unused()
            raise
        with self._lock:
            for model in spec.models():
                self._models[model.key].pairs.add(spec.key)
            self._pairs[spec.key] = _Pair(spec, self._clock(), active=1, pinned=pin)
        report = LoadReport(loaded, self._clock() - load_start, tuple(plan), evict_s)
        log.info(
            "device %s: loaded %s (%s in %.2fs), evicted %s",
            self.device,
            spec.key,
            format_bytes(loaded),
            report.load_s,
            [str(k) for k in plan] or "nothing",
        )
        return self._pipelines(spec), report

    def release(self, key: PairKey) -> None:
        with self._lock:
            pair = self._pairs.get(key)
            if pair is not None and pair.active > 0:
                pair.active -= 1
                pair.last_used = self._clock()

    def unpin(self, key: PairKey) -> bool:
        """Let `key` be evicted again (it stays resident until room is needed); whether it was pinned."""
        with self._lock:
            pair = self._pairs.get(key)
            if pair is None or not pair.pinned:
                return False
            pair.pinned = False
            return True

    def evict_idle(self) -> list[PairKey]:
        """Evict every pair no job uses (e.g. to retry after running out of device memory)."""
        with self._lock:
            idle = [k for k, p in self._pairs.items() if p.active == 0 and not p.pinned]
        for key in idle:
            self._evict(key, set())
        return idle

    # ---- internals --------------------------------------------------------------------------------------

    def _pipelines(self, spec: PairSpec) -> PipelinePair:
        refiner = None if spec.refiner is None else self._models[spec.refiner.key].pipeline
        return PipelinePair(self._models[spec.base.key].pipeline, refiner)

    def _unique_bytes(self, spec: PairSpec) -> int:
        seen: dict[str, int] = {}
        for model in spec.models():
            for c in model.components:
                seen[c.fingerprint] = c.device_bytes(self.half)
        return sum(seen.values())

    def _missing_bytes(self, spec: PairSpec) -> int:
        seen: dict[str, int] = {}
        for model in spec.models():
            for c in model.components:
                if c.fingerprint not in self._components:
                    seen[c.fingerprint] = c.device_bytes(self.half)
        return sum(seen.values())

    def _pair_bytes(self, spec: PairSpec) -> int:
        fingerprints = {c.fingerprint for m in spec.models() for c in m.components}
        return sum(self._components[f].nbytes for f in fingerprints if f in self._components)

    def _plan(self, spec: PairSpec, protected: set[PairKey]) -> list[PairKey] | None:
        """The LRU-first evictions that make room for `spec`, or None if it cannot fit now."""
        if spec.key in self._pairs:
            return []
        needed = self._missing_bytes(spec)
        used = sum(c.nbytes for c in self._components.values())
        if used + needed <= self.budget_bytes:
            return []
        keep = {c.fingerprint for m in spec.models() for c in m.components}
        candidates = sorted(
            (p for k, p in self._pairs.items() if p.active == 0 and not p.pinned and k not in protected),
            key=lambda p: p.last_used,
        )
        plan: list[PairKey] = []
        evicted: set[PairKey] = set()
        for pair in candidates:
            plan.append(pair.spec.key)
            evicted.add(pair.spec.key)
            if used - self._freed_bytes(evicted, keep) + needed <= self.budget_bytes:
                return plan
        return None

    def _freed_bytes(self, evicted: set[PairKey], keep: set[str]) -> int:
        """Bytes freed if every pair in `evicted` went, keeping the fingerprints in `keep`."""
        gone_models = {key for key, model in self._models.items() if model.pairs and model.pairs <= evicted}
        freed = 0
        for fingerprint, component in self._components.items():
            if fingerprint not in keep and component.users and component.users <= gone_models:
                freed += component.nbytes
        return freed

    def _load_model(self, spec: ModelSpec, on_load: Callable[[ModelSpec, bool], None]) -> int:
        with self._lock:
            if spec.key in self._models:
                return 0
            reuse = {
                c.name: self._components[c.fingerprint].module
                for c in spec.components
                if c.fingerprint in self._components
            }
        on_load(spec, False)
        pipeline = self._load(spec, reuse)
        loaded = 0
        with self._lock:
            for c in spec.components:
                entry = self._components.get(c.fingerprint)
                if entry is None:
                    module = pipeline.components[c.name]
                    entry = self._components[c.fingerprint] = _Component(module, c.device_bytes(self.half))
                    loaded += entry.nbytes
                entry.users.add(spec.key)
            self._models[spec.key] = _Model(spec, pipeline, tuple(c.fingerprint for c in spec.components))
        on_load(spec, True)
        return loaded

    def _evict(self, key: PairKey, keep: set[str]) -> None:
        # The tables hold the only references to the modules; dropping them in a separate frame means no local
        # variable here keeps a module alive while the allocator is asked to give the memory back.
        unloaded = self._drop(key, keep)
        if unloaded is None:
            return
        self._release_memory()
        for spec in unloaded:
            self._on_unload(spec)
        log.info("device %s: evicted %s", self.device, key)

    def _forget_unused(self) -> None:
        """After a failed load: drop the models no pair uses (the half of a pair that did load) and the
        components no model uses."""
        orphans: list[ModelSpec] = []
        with self._lock:
            for key in [k for k, m in self._models.items() if not m.pairs]:
                model = self._models.pop(key)
                orphans.append(model.spec)
                for fingerprint in model.fingerprints:
                    component = self._components.get(fingerprint)
                    if component is not None:
                        component.users.discard(key)
            for fingerprint in [f for f, c in self._components.items() if not c.users]:
                del self._components[fingerprint]
        self._release_memory()
        for spec in orphans:
            self._on_unload(spec)

    def _drop(self, key: PairKey, keep: set[str]) -> list[ModelSpec] | None:
        """Remove `key` from the tables; returns the models that went with it (None if it was not here)."""
        unloaded: list[ModelSpec] = []
        with self._lock:
            pair = self._pairs.pop(key, None)
            if pair is None:
                return None
            for model_spec in pair.spec.models():
                model = self._models.get(model_spec.key)
                if model is None:
                    continue
                model.pairs.discard(key)
                if model.pairs:
                    continue
                del self._models[model_spec.key]
                unloaded.append(model_spec)
                for fingerprint in model.fingerprints:
                    component = self._components.get(fingerprint)
                    if component is not None:
                        component.users.discard(model_spec.key)
                        if not component.users and fingerprint not in keep:
                            del self._components[fingerprint]
        return unloaded
