"""The model store's front door: turn an identifier into a `ModelRecord` that loads with no network.

    store = ModelStore(settings)
    with store.lease("civitai:101055@128080"):       # in use from here: never evicted, never deleted
        record = store.resolve("civitai:101055@128080", progress=on_progress)  # downloads once, then cached
        pipeline = load_pipeline(record, ...)

`resolve` answers from the index when the model is cached (no network, a few SQLite reads and stats).
Otherwise one flight per model fetches it (`_flights`): concurrent requests for the same model in this process
wait for that one download and all receive its progress; another process sharing the cache folder waits on the
per-file lock and finds the file in place. How a model gets in depends on its source: downloaded and verified
(`_model_download`, `_file_download`), built here (`_builtin`), or registered where it lies
(`_sources/local.py`). Where it is kept: `_cache` (layout, quota, eviction), `_index` (SQLite), `_snapshots`
(model folders).

Who wants a model (`DownloadCause`) decides whether a request may download it and what it may evict
(`_on_demand`); a full disk is `DiskFull`, never a stray OSError (`_disk_space`).

Before a process first uses a cached model its files are checked against digests kept since they entered the
cache; `verify` checks their SHA256 in full (`_integrity`). A store made `check_weights_when_loaded` (the
server's) leaves the check of a checkpoint's weight files to the read that loads them (`_weight_checks`).

With `settings.read_only` the cache is a volume another process filled (`_read_only`): every model in it
serves, nothing in it is ever written, and what would need a write is `ReadOnlyCache`.

Operators get `pull`, `verify`, `list_models`, `describe`, `delete`, `pin`, `used_bytes` and `lookup` (which
never touches the network).

A model is named by an `AIR` or by its text. The server parses a request's models once, at its edge, and hands
the store those AIRs as they are; text, from callers that hold nothing else (scripts, the benchmarks, tests,
a child process given its model on the command line), is parsed here.

HTTP goes through one `requests.Session`: the caller's (`session=`, e.g. a test's, left open by `close`) or the
store's own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import requests

from modelstore import _builtin, _builtin_loras, _read_only, local_files
from modelstore import _integrity as integrity
from modelstore._cache import Cache
from modelstore._disk_space import disk_full_as_error
from modelstore._file_download import Downloader, RetryPolicy
from modelstore._flights import Flight, Flights
from modelstore._http import guard_library_logs
from modelstore._integrity import BlobChecks, Damage, describe, quarantined_files, verification
from modelstore._leases import Leases
from modelstore._model_download import download_model
from modelstore._on_demand import DownloadCounts, gate, require_servable
from modelstore._source_pool import SourcePool
from modelstore._sources import local as local_source
from modelstore._weight_checks import owed_checks, settle_first
from modelstore.air import AIR, Source, parse_stored_air
from modelstore.components import Component, components_of
from modelstore.downloads import PULL, Cause, DownloadCause
from modelstore.errors import (
    DownloadAbandoned,
    IntegrityError,
    ModelInUse,
    ModelNotFound,
    ReadOnlyCache,
    SourceUnavailable,
    concerning,
)
from modelstore.progress import ProgressCallback, ProgressFanout
from modelstore.record import CachedModel, ModelRecord, Verdict, Verification
from modelstore.settings import StoreSettings

log = logging.getLogger(__name__)

__all__ = ["ModelStore", "RetryPolicy"]

ModelRef = str | AIR | ModelRecord
# How many times a model is fetched in one resolve when its files keep failing their check.
_FETCHES = 2


class ModelStore:
    def __init__(
        self,
        settings: StoreSettings,
        *,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        check_weights_when_loaded: bool = False,
    ) -> None:
        self.settings = settings
        self._defer = check_weights_when_loaded  # only for records that go to `load_pipeline` (`_weight_checks`)
        self._cache = Cache(settings.cache_dir, settings.max_bytes, read_only=settings.read_only)
        self._checks = BlobChecks(self._cache)
        guard_library_logs((settings.civitai_token, settings.hf_token))
        self._own_session = session is None
        self._session = requests.Session() if session is None else session
        self._downloader = Downloader(
            self._cache.blobs, self._session, retry=retry, secrets=(settings.civitai_token, settings.hf_token)
        )
        self._sources = SourcePool(settings, self._session)
        self._flights = Flights()
        self._leases = Leases(settings.cache_dir / "leases", shared=not settings.read_only)
        self._local_roots: tuple[Path, ...] = ()
        self._downloads = DownloadCounts()

    def confine_local(self, roots: Iterable[Path]) -> None:
        """Folders whose local models may read nothing outside them (a server's `--local-models`): a model
        named under one of them is opened below it without following a changed name, and a link in its folder
        that leads out of the roots is refused (`local_files`). Added to those given before."""
        self._local_roots = tuple(dict.fromkeys((*self._local_roots, *roots)))

    def close(self) -> None:
        if self._own_session:
            self._session.close()
        self._leases.close()
        self._cache.close()

    # --- resolving -----------------------------------------------------------------------------------------

    def resolve(
        self,
        model: str | AIR,
        *,
        progress: ProgressCallback | None = None,
        give_up: threading.Event | None = None,
        cause: DownloadCause = PULL,
    ) -> ModelRecord:
        """The record of `model`, fetching it into the cache first if needed (blocking), for `cause` (a
        request may only download what the settings' `on_demand` policy allows: DownloadRefused otherwise).

        Before a record is first handed out in this process, its files are checked against the digests kept
        when they entered the cache (`_integrity`; VERIFYING progress): a file that fails is quarantined and the
        model fetched again where its source allows, else IntegrityError. `progress` receives
        `DownloadProgress` while a download runs (also when this call joins a download another request
        started). `give_up` is set by a caller that no longer wants the model (a cancelled request): the
        download stops once every caller of it has given up, keeping its bytes for the next one, and raises
        DownloadAbandoned. A call waiting on a download another call runs raises it within a tenth of a second
        of giving up; the call that runs the download returns when it ends or stops. Raises the
        `modelstore.errors` tree."""
        return self._resolve(_air(model), progress, give_up, again=False, cause=cause)

    def pull(
        self,
        model: str | AIR,
        progress: ProgressCallback | None = None,
        *,
        give_up: threading.Event | None = None,
    ) -> ModelRecord:
        """Make sure `model` is in the cache (an operator's pre-fetch): `resolve`, except that the files of a
        cached model are checked again even if this process checked them before."""
        return self._resolve(_air(model), progress, give_up, again=True, cause=PULL)

    def _resolve(
        self,
        air: AIR,
        progress: ProgressCallback | None,
        give_up: threading.Event | None,
        *,
        again: bool,
        cause: DownloadCause,
    ) -> ModelRecord:
        defer = self._defer and not again
        with concerning(air.canonical), disk_full_as_error(self.settings.cache_dir, air):
            record = self._cached(air, touch=True, progress=progress, again=again, defer=defer)
            if record is None and self.settings.read_only:
                raise _read_only.not_cached(air.canonical)
            if record is None:
                if air.canonical not in self._flights:  # a request may wait for an operator's download
                    gate(air, cause, self.settings.on_demand, self._cache)
                lead = functools.partial(self._lead, air, cause=cause, defer=defer)
                record = self._flights.run(air.canonical, lead, progress, give_up)
            if not cause.on_demand:
                self._cache.claim(air)  # pulled or pinned: the operator's now, whoever fetched it
            if not defer or record.is_lora:
                return record
            again_now = functools.partial(self._resolve, air, progress, give_up, again=False, cause=cause)
            return owed_checks(record, self._cache, self._checks, functools.partial(self._repair, air, again_now))

    def _repair(self, air: AIR, resolve_again: Callable[[], ModelRecord], damage: str) -> ModelRecord:
        """After the load of `air` found `damage` (set aside): what `resolve` does when its own check fails."""
        self._refetch_or_raise(air, damage)
        return resolve_again()

    def lookup(self, model: str | AIR, *, check: bool = True) -> ModelRecord | None:
        """The record of `model` if it is cached and intact (checked as `resolve` does), else None. Never
        touches the network.

        With `check=False` nothing is read or hashed: the record of a model whose files are all in place, as
        far as the index and a few stats tell (for a read-ahead, e.g.; what loads a model uses `resolve`)."""
        air = _air(model)
        if not check:
            entry = self._cache.lookup(air)
            return None if entry is None else self._cache.record(air, entry)
        try:
            return self._cached(air, touch=False)
        except (IntegrityError, ReadOnlyCache):  # damaged (and not to be fetched again here)
            return None

    def _cached(
        self,
        air: AIR,
        *,
        touch: bool,
        progress: ProgressCallback | None = None,
        again: bool = False,
        defer: bool = False,
    ) -> ModelRecord | None:
        entry = self._cache.lookup(air)
        if entry is None:
            return None
        if entry.source == Source.LOCAL.value:
            fingerprint = entry.metadata.get("fingerprint", {})
            if not local_source.fingerprint_matches(Path(entry.path), fingerprint, self._local_roots):
                return None  # the files changed since they were hashed: re-register
        elif damages := self._checks.check(
            entry, progress, again=again, later=self._checks.deferrable(entry, defer).values()
        ):
            self._refetch_or_raise(air, describe(damages))
            return None
        if touch:
            self._cache.touch(air)
        if entry.source == Source.LOCAL.value:  # a load opens again exactly what was hashed (`local_files`)
            return local_files.checked(self._cache.record(air, entry), fingerprint, self._local_roots)
        return self._cache.record(air, entry)

    def _refetch_or_raise(self, air: AIR, damage: str) -> None:
        """After a file of `air` failed its check (and was quarantined): IntegrityError unless it can be fetched
        again (a built-in model is rebuilt; a download needs the network; a read-only cache holds what it holds)."""
        if self.settings.read_only:
            raise _read_only.damaged(air.canonical, damage)
        if integrity.refetchable(self.settings, air):
            log.warning("%s: %s; fetching it again", air, damage)
            return
        log.error("%s: %s; downloads are turned off (offline mode), so it stays unusable", air, damage)
        raise integrity.damaged_offline(air, damage)

    def _lead(self, air: AIR, flight: Flight, *, cause: DownloadCause, defer: bool) -> ModelRecord:
        """Fetch `air` for everyone in `flight` (unless another flight has cached it since our first look), then
        check what the fetch did not verify itself (files other models had brought in already)."""
        try:
            if air.source is Source.LOCAL:
                return self._cached(air, touch=True) or self._fetch(air, flight, cause)
            for _ in range(_FETCHES):
                record = self._cached(air, touch=True, defer=defer)
                if record is not None:
                    return record
                fetched = self._fetch(air, flight, cause)
                if cause.on_demand:
                    require_servable(fetched, self._cache)
            return self._cached(air, touch=True, defer=defer) or integrity.still_damaged(air, _FETCHES)
        except DownloadAbandoned:
            # Logged here, once the partial file is closed and complete: operators (and tests) wait for it.
            log.info("stopped downloading %s: everyone waiting for it went away; the bytes are kept", air)
            raise

    def _fetch(self, air: AIR, flight: Flight, cause: DownloadCause) -> ModelRecord:
        if air.source is Source.LOCAL:
            return local_source.register(air, self._cache, flight.progress, self._local_roots)
        if air.source is Source.BUILTIN:  # a tiny model or a tiny LoRA, built here
            install = _builtin_loras.install if _builtin_loras.names_a_lora(air) else _builtin.install
            return install(air, self._cache, self._in_use)
        if self.settings.offline:
            entry = self._cache.index.get(air.canonical)
            set_aside = [] if entry is None else quarantined_files(self._cache, entry)
            if set_aside:
                raise integrity.damaged_offline(air, f"{', '.join(set_aside)} failed its check")
            raise SourceUnavailable(f"{air.canonical} is not in the cache and downloads are turned off (offline mode)")
        return download_model(
            air,
            self._sources.get(air.source),
            flight,
            cache=self._cache,
            downloader=self._downloader,
            in_use=self._in_use,
            cause=cause,
            floor=self.settings.min_free_bytes if cause.on_demand else 0,
            started=self._downloads.started,
        )

    # --- operators -----------------------------------------------------------------------------------------

    def list_models(self) -> list[CachedModel]:
        """Every model in the index, with its size, architecture, last use and pin."""
        return self._cache.models(self._in_use)

    def describe(self, model: str | AIR) -> CachedModel:
        """The index row of one cached model; ModelNotFound if it is not cached."""
        air = _air(model)
        described = self._cache.model(air, self._in_use)
        if described is None:
            raise ModelNotFound(f"{air.canonical} is not in the cache", air=air.canonical)
        return described

    def components(self, record: ModelRecord, progress: ProgressCallback | None = None) -> tuple[Component, ...]:
        """What `record` is made of on a device (sizes, content fingerprints); see `modelstore.components`.
        The first call for a model reads all its weights: `progress` hears it as VERIFYING progress. Later
        calls (in any process sharing the cache) read a memo and report nothing."""
        measuring = ProgressFanout(record.canonical)
        measuring.set_verifying()
        if progress is not None:
            measuring.subscribe(progress)
        # Measuring reads the weights: a record whose checks were left to its load has them made first.
        before = None if record.weight_checks is None else functools.partial(settle_first, record)
        keep = not self.settings.read_only
        components = components_of(record, self.settings.cache_dir, measuring, keep=keep, before_measuring=before)
        if measuring.counted:
            measuring.finish()
        return components

    def verify(
        self, models: Iterable[str | AIR] | None = None, progress: ProgressCallback | None = None
    ) -> Iterator[Verification]:
        """Read every file of each of `models` (None: every cached model) in full and compare its SHA256 with the
        name it is stored under, which is the hash its source published; one `Verification` per model, as each
        is done. A file that does not match is quarantined, and the model fetched again where its source
        allows (REPAIRED), else CORRUPT. Local models are the operator's files: SKIPPED. `progress` hears the
        reading (VERIFYING) and any download. ModelNotFound for a model that is not cached."""
        airs = [_air(m) for m in models] if models is not None else [_air(m.air) for m in self.list_models()]
        done: dict[str, Damage | None] = {}  # blobs read in this run, shared by several models
        for air in airs:
            with concerning(air.canonical):
                yield self._verify(air, progress, done)

    def _verify(self, air: AIR, progress: ProgressCallback | None, done: dict[str, Damage | None]) -> Verification:
        entry = self._cache.index.get(air.canonical)
        if entry is None:
            raise ModelNotFound(f"{air.canonical} is not in the cache", air=air.canonical)
        if entry.source == Source.LOCAL.value:
            reason = "a local model: its files are the operator's, checked by size and time at each use"
            return Verification(air.canonical, Verdict.SKIPPED, 0, reason)
        with self.lease(air):  # neither evicted nor deleted while it is read
            fetch = functools.partial(self.resolve, air, progress=progress)
            return verification(self._checks, entry, progress, done, self.settings, fetch)

    def download_counts(self) -> dict[Cause, int]:
        """Downloads this store began, per cause (a model whose files were all here is not counted)."""
        return self._downloads.snapshot()

    def used_bytes(self) -> int:
        """What the cache holds on disk, as the quota (`settings.max_bytes`) counts it: each distinct file once,
        and the files set aside as damaged (`quarantine/`, until they are a week old or the quota needs room)."""
        return self._cache.used_bytes()

    def delete(self, model: str | AIR) -> int:
        """Remove `model` from the cache (its files, unless other models share them); the bytes freed.
        ModelInUse while it is leased or downloading; ModelNotFound if it is not cached. A local model is only
        forgotten (0 bytes freed)."""
        air = _air(model)
        with concerning(air.canonical):
            if self.settings.read_only:
                raise _read_only.refused(f"deleting {air.canonical}", air.canonical)
            if self._in_use(air.canonical):
                raise ModelInUse(f"{air.canonical} is in use and cannot be deleted now")
            return self._cache.delete(air, self._in_use)

    def pin(self, model: str | AIR, pinned: bool = True) -> None:
        """Exempt `model` from eviction (or make it evictable again)."""
        air = _air(model)
        with concerning(air.canonical):
            self._cache.pin(air, pinned)

    # --- in use --------------------------------------------------------------------------------------------

    def lease(self, model: ModelRef) -> contextlib.AbstractContextManager[None]:
        """Mark `model` in use for the duration of the block (reference counted, thread-safe, and seen by every
        process sharing the cache): it is never evicted and cannot be deleted meanwhile. May be taken before
        the model is resolved."""
        return self._leases.held(_canonical(model))

    def acquire(self, model: ModelRef) -> str:
        """Mark `model` in use until a matching `release`; returns its canonical AIR."""
        key = _canonical(model)
        self._leases.acquire(key)
        return key

    def release(self, model: ModelRef) -> None:
        self._leases.release(_canonical(model))

    def _in_use(self, canonical: str) -> bool:
        return canonical in self._flights or self._leases.held_anywhere(canonical)


def _air(model: str | AIR) -> AIR:
    """`model` as an AIR: one given as an AIR is used as it is, never parsed again; text a checkpoint or LoRA."""
    return parse_stored_air(model) if isinstance(model, str) else model


def _canonical(model: ModelRef) -> str:
    if isinstance(model, ModelRecord):
        return model.canonical
    return _air(model).canonical
