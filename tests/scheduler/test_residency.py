"""Residency under a budget: pairs load together, shared components are held once, eviction is LRU among idle
pairs that nobody waits for, and evicted modules are really freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from modelstore import ModelStore
from modelstore.air import parse_air
from modelstore.components import Component, components_of
from modelstore.record import Architecture, Layout, ModelRecord
from server.core.domain import PairKey
from server.core.errors import OutOfDeviceMemory
from server.scheduling.pairs import ModelSpec, PairSpec
from server.scheduling.residency import Residency
from tests.conftest import TINY_BASE, TINY_REFINER

MB = 1_000_000


class Module:
    """Stands in for a torch module; weakly referenceable so tests can see it freed."""

    def __init__(self, name: str) -> None:
        self.name = name


class Pipeline:
    def __init__(self, components: dict[str, Module]) -> None:
        self.components = components


class FakeLoader:
    def __init__(self) -> None:
        self.loaded: list[tuple[str, str, tuple[str, ...]]] = []  # (model, role, reused component names)

    def __call__(self, spec: ModelSpec, reuse: Mapping[str, Any]) -> Pipeline:
        self.loaded.append((spec.record.canonical, spec.role, tuple(sorted(reuse))))
        return Pipeline({c.name: reuse.get(c.name) or Module(c.fingerprint) for c in spec.components})


def component(name: str, fingerprint: str, mb: int) -> Component:
    return Component(name, fingerprint, mb * MB, mb * MB, 2 * mb * MB)


def model(name: str, role: str, *components: Component) -> ModelSpec:
    record = ModelRecord(
        parse_air(f"builtin:{name}@1"), Path("/nonexistent"), Layout.DIFFUSERS, Architecture.SDXL_BASE, 0, name
    )
    return ModelSpec(record, role, components)


SHARED_VAE = component("vae", "vae-official", 10)
SHARED_TE2 = component("text_encoder_2", "te2-official", 20)


def pair(base: str, refiner: str | None = None) -> PairSpec:
    b = model(
        base,
        "base",
        component("unet", f"unet-{base}", 50),
        SHARED_VAE,
        SHARED_TE2,
        component("text_encoder", f"te1-{base}", 5),
    )
    r = (
        None
        if refiner is None
        else model(refiner, "refiner", component("unet", f"unet-{refiner}", 40), SHARED_VAE, SHARED_TE2)
    )
    return PairSpec(PairKey(b.record.air, None if r is None else r.record.air), b, r)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def residency(budget_mb: int, loader: FakeLoader | None = None) -> tuple[Residency, FakeLoader, list[int]]:
    loader = loader or FakeLoader()
    releases: list[int] = []
    res = Residency(
        "cpu", budget_mb * MB, half=True, load=loader, release_memory=lambda: releases.append(1), clock=Clock()
    )
    return res, loader, releases


def test_a_pair_loads_together_and_shared_components_are_held_once() -> None:
    res, loader, _ = residency(1000)
    pipes, report = res.acquire(pair("a", "r"), set())
    assert pipes.base is not None and pipes.refiner is not None
    # The refiner received the base's VAE and OpenCLIP encoder instead of loading them again...
    assert loader.loaded == [("builtin:a@1", "base", ()), ("builtin:r@1", "refiner", ("text_encoder_2", "vae"))]
    assert pipes.refiner.components["vae"] is pipes.base.components["vae"]
    # ...and they are counted once: 50 + 10 + 20 + 5 for the base, 40 for the refiner's UNet.
    assert report.loaded_bytes == res.used_bytes == 125 * MB


def test_a_resident_pair_is_reused_without_loading() -> None:
    res, loader, _ = residency(1000)
    res.acquire(pair("a", "r"), set())
    res.release(pair("a", "r").key)
    _, report = res.acquire(pair("a", "r"), set())
    assert report.loaded_bytes == 0 and len(loader.loaded) == 2


def test_eviction_is_lru_among_idle_pairs_and_only_as_much_as_needed() -> None:
    res, _, releases = residency(200)  # a+r: 125 MB; each more base adds 55 MB (the rest is shared)
    for name in ("a", "b"):
        res.acquire(pair(name, "r"), set())
        res.release(pair(name, "r").key)
    res.acquire(pair("a", "r"), set())  # touch a: b is now least recently used
    res.release(pair("a", "r").key)
    _, report = res.acquire(pair("c", "r"), set())
    assert report.evicted == (pair("b", "r").key,)
    assert res.holds(pair("a", "r").key) and not res.holds(pair("b", "r").key)
    assert releases == [1]
    # The shared refiner, VAE and encoder stayed: only b's own UNet and CLIP-L (55 MB) went.
    assert res.used_bytes == 125 * MB + 55 * MB


def test_pairs_in_use_or_awaited_are_never_evicted() -> None:
    res, _, _ = residency(200)
    res.acquire(pair("busy", "r"), set())  # not released: a job is running on it
    res.acquire(pair("wanted", "r"), set())
    res.release(pair("wanted", "r").key)
    protected = {pair("wanted", "r").key}  # a queued job waits for it
    assert not res.fits(pair("new", "r"), protected)
    with pytest.raises(OutOfDeviceMemory):
        res.acquire(pair("new", "r"), protected)
    assert res.fits(pair("new", "r"), set())  # once nobody waits for it, it may go


def test_a_pair_larger_than_the_budget_can_never_fit() -> None:
    res, _, _ = residency(100)
    assert not res.could_ever_fit(pair("a", "r"))
    assert res.could_ever_fit(pair("a"))  # the base alone (85 MB) fits


def test_evicted_modules_are_freed() -> None:
    res, _, _ = residency(130)
    pipes, _ = res.acquire(pair("a", "r"), set())
    unet = weakref.ref(pipes.base.components["unet"])
    vae = weakref.ref(pipes.base.components["vae"])
    del pipes
    res.release(pair("a", "r").key)
    res.acquire(pair("b"), set())  # needs a's UNet and CLIP-L space, keeps the shared VAE
    gc.collect()
    assert unet() is None, "the evicted UNet is still referenced somewhere"
    assert vae() is not None, "the VAE is shared with the new pair and must stay"


def test_real_tiny_pair_shares_vae_and_text_encoder(model_store: ModelStore) -> None:
    """The built-in pair is built like the official one: the refiner reuses two of the base's components."""
    base = model_store.resolve(TINY_BASE)
    refiner = model_store.resolve(TINY_REFINER)
    base_parts = {c.name: c.fingerprint for c in components_of(base)}
    refiner_parts = {c.name: c.fingerprint for c in components_of(refiner)}
    assert refiner_parts["vae"] == base_parts["vae"]
    assert refiner_parts["text_encoder_2"] == base_parts["text_encoder_2"]
    assert refiner_parts["unet"] != base_parts["unet"]
    assert "text_encoder" not in refiner_parts
