"""Cold start: the pinned pairs' cached weight files are read ahead while the server imports; nothing is
registered, hashed or downloaded on the way."""

from __future__ import annotations

from pathlib import Path

from modelstore import ModelStore, StoreSettings, parse_air
from server.domain import PairKey
from server.prefetch import prefetch_pinned
from server.settings import Settings
from tests.conftest import TINY_BASE, TINY_REFINER
from tests.fixtures.variants import write_variant_base


def test_only_cached_pinned_models_are_read_ahead(
    store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    base = model_store.resolve(TINY_BASE)
    model_store.resolve(TINY_REFINER)
    unregistered = parse_air(f"local:{write_variant_base(base.path, tmp_path / 'never-registered')}").canonical
    pins = (PairKey(TINY_BASE, TINY_REFINER), PairKey(unregistered, None))
    files = prefetch_pinned(Settings(store=store_settings, pins=pins))
    assert set(files) == set(base.path.rglob("*.safetensors")) | set(
        model_store.resolve(TINY_REFINER).path.rglob("*.safetensors")
    )
    assert model_store.lookup(unregistered) is None  # a local model is registered by the server, not here
