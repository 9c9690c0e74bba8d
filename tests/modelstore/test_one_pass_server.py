"""Cold start in one pass through a real server (issue 19): the server's own store leaves each cached model's
weight check to the read that loads it, and a damaged file still never makes an image: a pinned model whose
file fails is fetched again (a built-in one rebuilt) before the server is ready, or refused at start and for
every request where it cannot be fetched, while the other pairs are served.

The servers here build their store themselves, as `refinery serve` does (no `store=`), each over a copy of
the session's cache: a new process as far as the cache can tell.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelstore import ModelStore, StoreSettings, parse_air
from server.core.domain import PairKey
from tests.conftest import TINY_BASE, TINY_REFINER
from tests.fakes.civitai import FakeCivitai
from tests.integration.conftest import ServerThread, make_settings
from tests.integration.test_damaged_models import (
    CIVITAI_BASE,
    UNET,
    _damaged_civitai_cache,
    _status,
    civitai_base,
    copy_cache,
    flip_byte_at,
    in_the_unet,
    pixels,
)

__all__ = ["civitai_base"]  # the fixture, shared with the damaged-models tests
PAIR = PairKey(parse_air(TINY_BASE), parse_air(TINY_REFINER))


@pytest.fixture
def tiny_cache(tmp_path: Path, store_settings: StoreSettings, model_store: ModelStore) -> Path:
    for air in (TINY_BASE, TINY_REFINER):
        model_store.resolve(air)  # built into the session's cache (once), then copied
    return copy_cache(store_settings.cache_dir, tmp_path / "cache")


class Serving:
    """A started server over `settings`, ready, with its own store (closed with it)."""

    def __init__(self, settings: StoreSettings, pins: tuple[PairKey, ...]) -> None:
        self.thread = ServerThread(make_settings(settings, pins=pins))
        self.thread.wait_ready()

    def close(self) -> None:
        try:
            self.thread.close()
        finally:
            self.thread.server.store.close()


@pytest.fixture
def serving() -> Iterator[list[Serving]]:
    started: list[Serving] = []
    yield started
    for server in started:
        server.close()


def test_a_server_whose_pinned_unet_was_damaged_rebuilds_it_before_it_is_ready_and_serves_the_same_image(
    tiny_cache: Path, serving: list[Serving], caplog: pytest.LogCaptureFixture
) -> None:
    settings = StoreSettings(cache_dir=tiny_cache, offline=True)  # a built-in model is rebuilt offline too
    serving.append(Serving(settings, (PAIR,)))
    before = pixels(serving[0].thread)
    blob = (serving[0].thread.server.store.describe(TINY_BASE).path / UNET).resolve()
    serving.pop().close()
    flip_byte_at(blob, in_the_unet(blob))
    caplog.set_level(logging.INFO)

    serving.append(Serving(settings, (PAIR,)))
    with grpc.insecure_channel(serving[0].thread.address) as channel:
        status = _status(channel)
    after = pixels(serving[0].thread)

    assert not status.pin_failures
    assert np.array_equal(after, before)
    assert f"{TINY_BASE}: {UNET} changed since it entered the cache" in caplog.text
    assert (tiny_cache / "quarantine" / blob.name).is_file()
    # The damage was found by the load's own read: resolving at start read no weight of the pair.
    assert "weights read once" in caplog.text


def test_a_damaged_model_that_cannot_be_fetched_is_refused_at_start_and_never_makes_an_image(
    tmp_path: Path,
    tiny_cache: Path,  # the session's cache holds the pair, copied with the civitai base beside it
    store_settings: StoreSettings,
    civitai_base: tuple[FakeCivitai, bytes],
    serving: list[Serving],
) -> None:
    settings = _damaged_civitai_cache(tmp_path / "damaged", store_settings, civitai_base[0])
    serving.append(Serving(settings, (PairKey(parse_air(CIVITAI_BASE), None), PAIR)))
    thread = serving[0].thread
    with grpc.insecure_channel(thread.address) as channel:
        status = _status(channel)
    image = pixels(thread)
    with pytest.raises(grpc.RpcError) as refused:
        pixels(thread, CIVITAI_BASE)

    (failure,) = status.pin_failures
    assert failure.model == CIVITAI_BASE
    assert failure.error.message.startswith(f"model: {CIVITAI_BASE}: model.safetensors changed since it entered")
    assert "offline mode" in failure.error.message
    assert [(p.model, p.refiner_model) for p in status.devices[0].pairs] == [(TINY_BASE, TINY_REFINER)]
    assert image.shape == (64, 64, 3)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # never an image from the damaged weights
