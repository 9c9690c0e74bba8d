"""Fixtures for the model store's download half: fake civitai (API + separate storage host) and a fake Hugging
Face Hub, all real HTTP servers on loopback, and stores with their own cache folder per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from modelstore import ModelStore, StoreSettings
from modelstore.store import RetryPolicy
from tests.conftest import CIVITAI_TOKEN, HF_TOKEN
from tests.fakes.civitai import FakeCivitai
from tests.fakes.hub import FakeHub

# Tests do not wait for real back-off; the policy's shape is the same.
FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)

MakeStore = Callable[..., ModelStore]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_store(cache_dir: Path, civitai: FakeCivitai, hub: FakeHub) -> Iterator[MakeStore]:
    """Stores over one cache folder, pointed at the fakes; keyword arguments override settings, `session` is
    the HTTP session the store is given (its own when None)."""
    stores: list[ModelStore] = []

    def make(*, session: requests.Session | None = None, **overrides: object) -> ModelStore:
        values: dict[str, object] = {
            "cache_dir": cache_dir,
            "civitai_api": civitai.url,
            "civitai_token": CIVITAI_TOKEN,
            "hf_endpoint": hub.url,
            "hf_token": HF_TOKEN,
        }
        values.update(overrides)
        store = ModelStore(StoreSettings(**values), retry=FAST_RETRY, session=session)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
