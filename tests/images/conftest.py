"""An image store over a temporary folder with a clock the test moves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.images import ImageLimits, ImageStore, StoreLimits

LIMITS = StoreLimits(
    image=ImageLimits(max_bytes=64 * 1024, max_side=2048, max_pixels=2048 * 2048),
    default_keep_s=3600.0,
    max_keep_s=24 * 3600.0,
    quota_bytes=256 * 1024,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_store(tmp_path: Path, clock: Clock) -> Callable[..., ImageStore]:
    """A store over the test's folder (a second call: the same folder, as a restarted server finds it)."""

    def make(limits: StoreLimits = LIMITS) -> ImageStore:
        return ImageStore(tmp_path / "images", limits, clock=clock)

    return make


@pytest.fixture
def store(open_store: Callable[..., ImageStore]) -> ImageStore:
    return open_store()


def files_in(store: ImageStore) -> list[str]:
    return sorted(path.name for path in store.directory.iterdir())
