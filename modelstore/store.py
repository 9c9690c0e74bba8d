"""The model store's front door: turn an identifier into a `ModelRecord` that loads with no network.

    store = ModelStore(settings)
    with store.lease("civitai:101055@128080"):       # in use from here: never evicted, never deleted
        record = store.resolve("civitai:101055@128080", progress=on_progress)  # downloads once, then cached
        pipeline = load_pipeline(record, ...)

`resolve` answers from the index when the model is cached (no network, a few SQLite reads and stats).
Otherwise one flight per model fetches it: concurrent requests for the same model in this process wait for
that one download and all receive its progress; another process sharing the cache folder waits on the
per-file lock and finds the file in place. What is downloaded, verified and kept where is described in
download.py (resumable verified transfer), cache.py (layout, quota, eviction), index.py (SQLite) and
snapshots.py (model folders).

Operators get `pull`, `list_models`, `describe`, `delete`, `pin`, `used_bytes` and `lookup` (which never touches
the network).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from modelstore import _builtin
from modelstore._architecture import detect_file, detect_folder
from modelstore._blobs import sha256_file
from modelstore._cache import BlobsVanished, Cache, Need
from modelstore._download import Downloader, RemoteFile, RetryPolicy
from modelstore._http import new_client
from modelstore._index import IndexEntry
from modelstore._leases import Leases
from modelstore._sources import RemoteSource
from modelstore._sources import local as local_source
from modelstore.air import AIR, Source, parse_air
from modelstore.components import Component, components_of
from modelstore.errors import (
    DownloadAbandoned,
    ModelInUse,
    ModelNotFound,
    ModelStoreError,
    SourceUnavailable,
    WrongArchitecture,
    concerning,
)
from modelstore.progress import DownloadProgress, ProgressCallback, ProgressFanout
from modelstore.record import Architecture, CachedModel, Layout, ModelRecord, Role
from modelstore.settings import StoreSettings
from modelstore.units import format_bytes

log = logging.getLogger(__name__)

__all__ = [
    "ROLE_ARCHITECTURES",
    "CachedModel",
    "DownloadProgress",
    "ModelStore",
    "RetryPolicy",
    "require_role",
]

# What each role accepts: any SDXL model can continue a latent as refiner (diffusers' own mixture-of-denoisers
# example uses the base for both), but only a base can start from noise.
ROLE_ARCHITECTURES = {
    Role.BASE: (Architecture.SDXL_BASE,),
    Role.REFINER: (Architecture.SDXL_REFINER, Architecture.SDXL_BASE),
}

ModelRef = str | AIR | ModelRecord

# How soon a caller waiting on someone else's download notices that it gave up.
_GIVE_UP_POLL_S = 0.1


class _Flight:
    """One model being fetched in this process, and everybody waiting for it."""

    def __init__(self, canonical: str) -> None:
        self.canonical = canonical
        self.progress = ProgressFanout(canonical)
        self.done = threading.Event()
        self.record: ModelRecord | None = None
        self.error: BaseException | None = None
        # One entry per caller: the event it sets when it gives up, or None for a caller that never does.
        self._wants: list[threading.Event | None] = []
        self._wants_lock = threading.Lock()

    def join(self, give_up: threading.Event | None) -> None:
        with self._wants_lock:
            self._wants.append(give_up)

    def abandoned(self) -> bool:
        """Whether every caller has given up: then nobody is left to use what the download would bring."""
        with self._wants_lock:
            return all(w is not None and w.is_set() for w in self._wants)

    def stop_if_abandoned(self) -> None:
        if self.abandoned():
            raise DownloadAbandoned(
                f"{self.canonical}: everyone waiting for it went away; the download stopped and the bytes "
                "received are kept for the next request"
            )


class ModelStore:
    def __init__(self, settings: StoreSettings, *, retry: RetryPolicy | None = None) -> None:
        self.settings = settings
        self._cache = Cache(settings.cache_dir, settings.max_bytes)
        self._client = new_client()
        self._downloader = Downloader(
            self._cache.blobs, self._client, retry=retry, secrets=(settings.civitai_token, settings.hf_token)
        )
        self._sources: dict[Source, RemoteSource] = {}
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._leases = Leases(settings.cache_dir / "leases")

    def close(self) -> None:
        self._client.close()
        self._leases.close()
        self._cache.close()

    # --- resolving -----------------------------------------------------------------------------------------

    def resolve(
        self,
        model: str | AIR,
        *,
        progress: ProgressCallback | None = None,
        give_up: threading.Event | None = None,
    ) -> ModelRecord:
        """The record of `model`, fetching it into the cache first if needed (blocking).

        `progress` receives `DownloadProgress` while a download runs (also when this call joins a download
        another request started). `give_up` is set by a caller that no longer wants the model (a cancelled
        request): the download stops once every caller of it has given up, keeping its bytes for the next
        one, and raises DownloadAbandoned. A call waiting on a download another call runs raises it within
        a tenth of a second of giving up; the call that runs the download returns when it ends or stops.
        Raises the `modelstore.errors` tree."""
        air = _air(model)
        with concerning(air.canonical):
            record = self._cached(air, touch=True)
            if record is not None:
                return record
            return self._single_flight(air, progress, give_up)

    def pull(
        self,
        model: str | AIR,
        progress: ProgressCallback | None = None,
        *,
        give_up: threading.Event | None = None,
    ) -> ModelRecord:
        """Make sure `model` is in the cache (an operator's pre-fetch); same as `resolve`."""
        return self.resolve(model, progress=progress, give_up=give_up)

    def lookup(self, model: str | AIR) -> ModelRecord | None:
        """The record of `model` if it is cached and intact, else None. Never touches the network."""
        return self._cached(_air(model), touch=False)

    def _cached(self, air: AIR, *, touch: bool) -> ModelRecord | None:
        entry = self._cache.lookup(air)
        if entry is None:
            return None
        if entry.source == Source.LOCAL.value and not local_source.fingerprint_matches(
            Path(entry.path), entry.metadata.get("fingerprint", {})
        ):
            return None  # the files changed since they were hashed: re-register
        if touch:
            self._cache.touch(air)
        return self._cache.record(air, entry)

    def _single_flight(
        self, air: AIR, progress: ProgressCallback | None, give_up: threading.Event | None
    ) -> ModelRecord:
        key = air.canonical
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight(key)
            flight.join(give_up)
        if progress is not None:
            flight.progress.subscribe(progress)
        if not leader:
            while not flight.done.wait(None if give_up is None else _GIVE_UP_POLL_S):
                if give_up is not None and give_up.is_set():
                    raise DownloadAbandoned(f"{key}: gave up waiting for its download")
            if isinstance(flight.error, DownloadAbandoned) and not (give_up is not None and give_up.is_set()):
                return self._single_flight(air, progress, give_up)  # it stopped as this call joined: go again
            if isinstance(flight.error, ModelStoreError):
                raise flight.error.about(key)  # each waiter raises its own value (tracebacks are per raise)
            if flight.error is not None:
                raise flight.error
            assert flight.record is not None
            return flight.record
        try:
            # Another flight may have finished between our cache check and taking the lead.
            flight.record = self._cached(air, touch=True) or self._fetch(air, flight)
            return flight.record
        except BaseException as exc:
            if isinstance(exc, DownloadAbandoned):  # logged once the partial file is closed and complete
                log.info("stopped downloading %s: everyone waiting for it went away; the bytes are kept", key)
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def _fetch(self, air: AIR, flight: _Flight) -> ModelRecord:
        if air.source is Source.LOCAL:
            return self._register_local(air, flight.progress)
        if air.source is Source.BUILTIN:
            return self._build_builtin(air)
        if self.settings.offline:
            raise SourceUnavailable(f"{air.canonical} is not in the cache and downloads are turned off (offline mode)")
        return self._download(air, self._source(air.source), flight)

    def _source(self, source: Source) -> RemoteSource:
        with self._lock:
            if source not in self._sources:
                self._sources[source] = self._new_source(source)
            return self._sources[source]

    def _new_source(self, source: Source) -> RemoteSource:
        # Imported here: huggingface_hub is only needed by those who download from the Hub.
        if source is Source.CIVITAI:
            from modelstore._sources.civitai import CivitaiSource

            return CivitaiSource(self.settings.civitai_api, self.settings.civitai_token, self._client)
        from modelstore._sources.huggingface import HuggingFaceSource

        return HuggingFaceSource(self.settings.hf_endpoint, self.settings.hf_token)

    def _download(self, air: AIR, source: RemoteSource, flight: _Flight) -> ModelRecord:
        progress = flight.progress
        plan = source.plan(air)
        needs = [Need(f.sha256, f.approx_size) for f in plan.files]
        for attempt in (1, 2):
            with self._cache.reserve(air, needs, self._in_use):
                todo = [f for f in plan.files if f.sha256 is None or not self._cache.blobs.has(f.sha256)]
                total = sum(f.approx_size for f in todo)
                progress.set_total(total)
                if todo:
                    log.info("downloading %s from %s: %d file(s), %d bytes", air, source.name, len(todo), total)
                started = time.monotonic()
                files = {}
                for file in plan.files:
                    if file in todo:
                        flight.stop_if_abandoned()
                        progress.start_file(file.label)
                    files[file.path] = self._downloader.fetch(file, _FileProgress(flight, file))
                try:
                    record = self._cache.commit(
                        air,
                        source=air.source.value,
                        layout=plan.layout,
                        files=files,
                        metadata=plan.metadata,
                        detect=_detector(plan.layout),
                    )
                except BlobsVanished:
                    if attempt == 2:
                        raise SourceUnavailable(
                            f"{air.canonical}: its files were evicted by another process while downloading"
                        ) from None
                    log.warning("%s: files were evicted by another process meanwhile; fetching again", air)
                    continue
            progress.finish()
            if todo:
                elapsed = max(time.monotonic() - started, 1e-6)
                log.info("downloaded %s in %.1f s (%s/s)", air, elapsed, format_bytes(int(total / elapsed)))
            return record
        raise AssertionError("unreachable")

    def _build_builtin(self, air: AIR) -> ModelRecord:
        spec = _builtin.BUILTIN_MODELS.get(air.canonical)
        if spec is None:
            names = ", ".join(sorted(_builtin.BUILTIN_MODELS))
            raise ModelNotFound(f"no built-in model {air.canonical} (built-in: {names})")
        staging = Path(tempfile.mkdtemp(prefix="builtin-", dir=self._cache.root / "tmp"))
        try:
            folder = staging / "model"
            _builtin.build(spec, folder)
            paths = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
            shas = {relative: sha256_file(path) for relative, path in paths.items()}
            needs = [Need(shas[r], p.stat().st_size) for r, p in paths.items()]
            with self._cache.reserve(air, needs, self._in_use):
                for relative, path in paths.items():
                    check = relative if relative.endswith(".safetensors") else None
                    self._cache.blobs.adopt(path, shas[relative], check_safetensors_as=check)
                metadata = {"source": "builtin", "name": spec.name, "version": spec.version}
                return self._cache.commit(
                    air,
                    source="builtin",
                    layout=Layout.DIFFUSERS,
                    files=shas,
                    metadata=metadata,
                    detect=detect_folder,
                )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _register_local(self, air: AIR, progress: ProgressFanout) -> ModelRecord:
        path = Path(air.id)
        old = self._cache.index.get(air.canonical)
        previous = old.metadata.get("fingerprint", {}) if old is not None else {}
        progress.set_verifying()  # hashing gigabytes takes seconds: waiters see it as it goes
        model = local_source.inspect(path, previous, detect_file, progress)
        progress.finish()
        now = time.time()
        self._cache.register_local(
            IndexEntry(
                air=air.canonical,
                source=Source.LOCAL.value,
                layout=model.layout,
                architecture=model.architecture,
                path=str(path),
                sha256=model.sha256,
                size_bytes=model.size_bytes,
                metadata={"source": "local", "fingerprint": dict(model.fingerprint)},
                added=now,
                last_used=now,
                pinned=False,
            )
        )
        log.info("registered local model %s (%s)", path, model.architecture.label)
        return ModelRecord(air, path, model.layout, model.architecture, model.size_bytes, model.sha256)

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
        """What `record` is made of on a device (sizes, content fingerprints); see `modelstore/components.py`.
        The first call for a model reads all its weights: `progress` hears it as VERIFYING progress. Later
        calls (in any process sharing the cache) read a memo and report nothing."""
        measuring = ProgressFanout(record.canonical)
        measuring.set_verifying()
        if progress is not None:
            measuring.subscribe(progress)
        components = components_of(record, self.settings.cache_dir, measuring)
        if measuring.counted:
            measuring.finish()
        return components

    def used_bytes(self) -> int:
        """What the cache holds on disk, as the quota (`settings.max_bytes`) counts it: each distinct file once."""
        return self._cache.used_bytes()

    def delete(self, model: str | AIR) -> int:
        """Remove `model` from the cache (its files, unless other models share them); the bytes freed.
        ModelInUse while it is leased or downloading; ModelNotFound if it is not cached. A local model is only
        forgotten (0 bytes freed)."""
        air = _air(model)
        with concerning(air.canonical):
            if self._in_use(air.canonical):
                raise ModelInUse(f"{air.canonical} is in use and cannot be deleted now")
            return self._cache.delete(air, self._in_use)

    def pin(self, model: str | AIR, pinned: bool = True) -> None:
        """Exempt `model` from eviction (or make it evictable again)."""
        air = _air(model)
        with concerning(air.canonical):
            self._cache.pin(air, pinned)

    # --- in use --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, model: ModelRef) -> Iterator[None]:
        """Mark `model` in use for the duration of the block (reference counted, thread-safe, and seen by every
        process sharing the cache): it is never evicted and cannot be deleted meanwhile. May be taken before
        the model is resolved."""
        key = self.acquire(model)
        try:
            yield
        finally:
            self.release(key)

    def acquire(self, model: ModelRef) -> str:
        """Mark `model` in use until a matching `release`; returns its canonical AIR."""
        key = _canonical(model)
        self._leases.acquire(key)
        return key

    def release(self, model: ModelRef) -> None:
        self._leases.release(_canonical(model))

    def _in_use(self, canonical: str) -> bool:
        with self._lock:
            if canonical in self._flights:
                return True
        return self._leases.held_anywhere(canonical)


class _FileProgress:
    """Feeds one file's byte counts into its model's progress, and stops the download (by raising from the
    downloader's loop, which keeps the partial file) once nobody waits for it any more."""

    def __init__(self, flight: _Flight, file: RemoteFile) -> None:
        self._flight = flight
        self._progress = flight.progress
        self._file = file
        self._sized = file.size is not None

    def advance(self, nbytes: int) -> None:
        self._progress.advance(nbytes)
        if nbytes > 0:  # never while a failed attempt's count is being taken back
            self._flight.stop_if_abandoned()

    def exact_size(self, nbytes: int) -> None:
        if not self._sized:  # civitai states sizes in KB: correct the total once the server says exactly
            self._sized = True
            self._progress.adjust_total(nbytes - self._file.approx_size)


def require_role(record: ModelRecord, role: Role) -> None:
    """Raise WrongArchitecture unless `record` can serve as `role`."""
    allowed = ROLE_ARCHITECTURES[role]
    if record.architecture not in allowed:
        expected = " or ".join(a.label for a in allowed)
        raise WrongArchitecture(
            f"{record.canonical} is {record.architecture.label}; the {role} must be {expected}",
            expected=expected,
            found=record.architecture.label,
            role=role,
            air=record.canonical,
        )


def _detector(layout: Layout) -> Callable[[Path], Architecture]:
    return detect_file if layout is Layout.SINGLE_FILE else detect_folder


def _air(model: str | AIR) -> AIR:
    return parse_air(model) if isinstance(model, str) else model


def _canonical(model: ModelRef) -> str:
    if isinstance(model, ModelRecord):
        return model.canonical
    return _air(model).canonical
