"""Cold start: the pinned pairs' cached weight files are read ahead while the server imports; nothing is
registered, hashed or downloaded on the way."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from modelstore import ModelStore, StoreSettings, _digests, parse_air
from server.core.domain import PairKey
from server.core.settings import Settings
from server.prefetch import prefetch_pinned
from tests.conftest import TINY_BASE, TINY_REFINER
from tests.fixtures.variants import write_variant_base


def test_only_cached_pinned_models_are_read_ahead(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    base = model_store.resolve(TINY_BASE)
    model_store.resolve(TINY_REFINER)
    unregistered = parse_air(f"local:{write_variant_base(base.path, tmp_path / 'never-registered')}")
    pins = (PairKey(parse_air(TINY_BASE), parse_air(TINY_REFINER)), PairKey(unregistered, None))
    files = prefetch_pinned(Settings(store=store_settings, pins=pins))
    assert set(files) == set(base.path.rglob("*.safetensors")) | set(
        model_store.resolve(TINY_REFINER).path.rglob("*.safetensors")
    )
    assert model_store.lookup(unregistered) is None  # a local model is registered by the server, not here


def test_prefetch_reads_no_blob_in_full(
    store_settings: StoreSettings, model_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking a pinned pair's blobs (gigabytes) is the server's own store's job, once: the read-ahead only
    asks the kernel for the pages, and never digests a file (nor could it quarantine one)."""
    model_store.resolve(TINY_BASE)
    model_store.resolve(TINY_REFINER)
    digested: list[Path] = []
    whole_file = _digests._digest_file

    def counting(path: Path, hashes: Sequence[Any], counter: Any) -> list[str]:
        digested.append(path)
        return whole_file(path, hashes, counter)

    monkeypatch.setattr(_digests, "_digest_file", counting)
    files = prefetch_pinned(Settings(store=store_settings, pins=(PairKey.parse(f"{TINY_BASE}+{TINY_REFINER}"),)))
    assert files
    assert digested == []
    # The spy sees what a check reads: a fresh store's first lookup of the same model digests its blobs.
    fresh = ModelStore(store_settings)
    try:
        assert fresh.lookup(TINY_BASE) is not None
    finally:
        fresh.close()
    assert digested
