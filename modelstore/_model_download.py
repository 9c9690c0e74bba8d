"""Downloading a whole model from a remote source: its plan, room in the quota before the first byte, each of
its files through the downloader, then its folder and index row. Each download is logged and counted with
its `DownloadCause` (a request's id, a pull, a pin).

Every file is verified as it arrives (`_file_download`); the model is committed only once all of them are
blobs. If another process evicts one of them before the commit, the model is fetched once more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelstore._architecture import Identity, identify_file, identify_folder
from modelstore._cache import BlobsVanished, Cache, Need
from modelstore._file_download import Downloader
from modelstore._flights import Flight
from modelstore._remote import RemoteFile
from modelstore._sources import RemotePlan, RemoteSource
from modelstore.air import AIR
from modelstore.downloads import DownloadCause
from modelstore.errors import SourceUnavailable
from modelstore.record import Layout, ModelRecord
from modelstore.units import format_bytes

log = logging.getLogger(__name__)


def download_model(
    air: AIR,
    source: RemoteSource,
    flight: Flight,
    *,
    cache: Cache,
    downloader: Downloader,
    in_use: Callable[[str], bool],
    cause: DownloadCause,
    floor: int,
    started: Callable[[DownloadCause], None],
) -> ModelRecord:
    """Fetch `air` from `source` into `cache` for `cause`, reporting to `flight`; its record. `in_use` says
    which models eviction must spare; `floor`, the free space to leave on the disk; `started` hears of each
    download that begins (not of a model whose files were all here)."""
    plan = source.plan(air)
    retried = False
    while True:
        try:
            return _download_plan(plan, source.name, flight, cache, downloader, in_use, _Why(cause, floor, started))
        except BlobsVanished:
            if retried:
                raise SourceUnavailable(
                    f"{air.canonical}: its files were evicted by another process while downloading"
                ) from None
            retried = True
            log.warning("%s: files were evicted by another process meanwhile; fetching again", air)


def _download_plan(
    plan: RemotePlan,
    source: str,
    flight: Flight,
    cache: Cache,
    downloader: Downloader,
    in_use: Callable[[str], bool],
    why: _Why,
) -> ModelRecord:
    air, progress = plan.air, flight.progress
    needs = [Need(f.sha256, f.approx_size, cache.blobs.partial_size(f.key)) for f in plan.files]
    with cache.reserve(air, needs, in_use, on_demand=why.cause.on_demand, floor=why.floor):
        todo = [f for f in plan.files if f.sha256 is None or not cache.blobs.has(f.sha256)]
        total = sum(f.approx_size for f in todo)
        progress.set_total(total)
        if todo:
            log.info(
                "downloading %s from %s for %s: %d file(s), %s",
                air,
                source,
                why.cause,
                len(todo),
                format_bytes(total),
                extra={"download_cause": why.cause.cause.value},
            )
            why.started(why.cause)
        started = time.monotonic()
        files = {}
        for file in plan.files:
            if file in todo:
                flight.stop_if_abandoned()
                progress.start_file(file.label)
            files[file.path] = downloader.fetch(file, _FileProgress(flight, file))
        record = cache.commit(
            air,
            source=air.source.value,
            layout=plan.layout,
            files=files,
            metadata=plan.metadata,
            detect=_detector(plan.layout),
            on_demand=why.cause.on_demand,
        )
    progress.finish()
    if todo:
        elapsed = max(time.monotonic() - started, 1e-6)
        log.info("downloaded %s in %.1f s (%s/s)", air, elapsed, format_bytes(int(total / elapsed)))
    return record


@dataclass(frozen=True)
class _Why:
    cause: DownloadCause
    floor: int
    started: Callable[[DownloadCause], None]


class _FileProgress:
    """Feeds one file's byte counts into its model's progress, and stops the download (by raising from the
    downloader's loop, which keeps the partial file) once nobody waits for it any more."""

    def __init__(self, flight: Flight, file: RemoteFile) -> None:
        self._flight = flight
        self._progress = flight.progress
        self._file = file
        self._sized = file.size is not None

    def advance(self, nbytes: int, *, received: bool = False) -> None:
        self._progress.advance(nbytes, received=received)
        if nbytes > 0:  # never while a failed attempt's count is being taken back
            self._flight.stop_if_abandoned()

    def exact_size(self, nbytes: int) -> None:
        if not self._sized:  # civitai states sizes in KB: correct the total once the server says exactly
            self._sized = True
            self._progress.adjust_total(nbytes - self._file.approx_size)


def _detector(layout: Layout) -> Callable[[Path], Identity]:
    return identify_file if layout is Layout.SINGLE_FILE else identify_folder
