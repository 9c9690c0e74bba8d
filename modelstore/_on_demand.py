"""The store's side of `modelstore.downloads`: the gate a request's download passes first, the count of
downloads per cause, and the removal of a model a request brought in that no role can use."""

from __future__ import annotations

import logging
import threading

from modelstore._cache import Cache
from modelstore.air import AIR
from modelstore.downloads import Cause, DownloadCause, OnDemandPolicy
from modelstore.errors import DownloadRefused, WrongArchitecture
from modelstore.record import ModelRecord
from modelstore.role_policy import ROLE_ARCHITECTURES

log = logging.getLogger(__name__)

_SERVABLE = {a for allowed in ROLE_ARCHITECTURES.values() for a in allowed}


def gate(air: AIR, cause: DownloadCause, policy: OnDemandPolicy, cache: Cache) -> None:
    """DownloadRefused, before anything is fetched, when `cause` is a request and `policy` does not let it
    download `air`. A model the cache has a row for (its files set aside as damaged, or evicted by another
    process) was let in before: fetching it again is a repair, never refused."""
    if not cause.on_demand or policy.allows(air) or cache.index.get(air.canonical) is not None:
        return
    log.info("refused to download %s for %s: on-demand downloads are %s", air, cause, policy)
    raise DownloadRefused(
        f"{air.canonical} is not in the cache, and this server does not download models for requests "
        f"(on-demand downloads: {policy}); an operator can pull or pin it first",
        air=air.canonical,
    )


def require_servable(record: ModelRecord, cache: Cache) -> None:
    """After a download for a request: a model no role can use (not SDXL) is removed again, with its files,
    and refused, so requests cannot fill the cache with what nothing here runs."""
    if record.architecture in _SERVABLE:
        return
    log.warning("%s is %s, which nothing here serves: removing it from the cache", record.air, record.architecture)
    cache.discard(record.air)
    expected = " or ".join(sorted(a.label for a in _SERVABLE))
    raise WrongArchitecture(
        f"{record.canonical} is {record.architecture.label}, which this server cannot run; it was not kept",
        expected=expected,
        found=record.architecture.label,
        air=record.canonical,
    )


class DownloadCounts:
    """Downloads begun in this store, per cause (for `refinery_downloads_total{cause}`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(Cause, 0)

    def started(self, cause: DownloadCause) -> None:
        with self._lock:
            self._counts[cause.cause] += 1

    def snapshot(self) -> dict[Cause, int]:
        with self._lock:
            return dict(self._counts)
