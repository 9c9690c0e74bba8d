"""The cache as a whole: blobs + index + model folders, and the quota that keeps it within bounds.

On disk, under `settings.cache_dir`:

    index.sqlite                 which models are cached (see _index.py)
    blobs/sha256/ab/ab…          their files, by content (see _blobs.py)
    models/<name>/<digest>/      the folders the loader opens: symlinks into blobs (see _snapshots.py)
    partial/<sha256>.part        downloads in progress, resumable
    quarantine/<sha256>          blobs that failed their check (see _integrity.py), kept for a week
    locks/                       file locks shared with other processes using the same folder
    tmp/                         staging for folders and built-in models, renamed into place when complete;
                                 what a killed process left there is removed when a store opens the cache
                                 (see _staging.py)

Quota (`max_bytes`, 0 = none) counts the blob bytes on disk, each distinct content once, and the quarantined
blobs. Room for a model is made before its first byte is requested: quarantined blobs go first, then least
recently used models that are neither pinned nor in use are evicted, oldest first (for a download a request
caused, only models that requests brought in: never one an operator pulled or pinned), and a model that
cannot fit even then is refused with QuotaExceeded, one the free disk space cannot hold with DiskFull
(`_disk_space`). Eviction deletes a model's folder and index row, then the blobs no other model
uses. Local models (registered by reference) are never ours to delete and are not counted.

Every change of what is cached (commit, evict, delete) happens under one lock, a thread lock plus a file lock
shared with other processes, so eviction never deletes a blob another pull has just counted on.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelstore import _read_only
from modelstore._architecture import Identity
from modelstore._blobs import BlobStore, FileIdentity
from modelstore._disk_space import check_room
from modelstore._index import Index, IndexEntry
from modelstore._snapshots import Snapshots, content_digest
from modelstore._staging import UNCLAIMED_GRACE_S, clean_old_files, clean_stale
from modelstore.air import AIR
from modelstore.errors import ModelNotFound, QuotaExceeded
from modelstore.record import CachedModel, Layout, ModelKind, ModelRecord
from modelstore.units import format_bytes

log = logging.getLogger(__name__)

SINGLE_FILE_NAME = "model.safetensors"
# A blob that no model names is the trace of a crash between its rename and the index commit (or of a pull in
# another process that has not committed yet): collected only once it is `UNCLAIMED_GRACE_S` old. A partial
# download is kept this long for a later pull to resume.
_STALE_PARTIAL_S = 14 * 24 * 3600.0
# A quarantined blob is kept this long for an operator to look at, then removed when a store opens the cache.
_QUARANTINE_KEPT_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Need:
    """A file a model needs: its blob (when known in advance), its size, and what its partial file holds."""

    sha256: str | None
    size: int
    partial: int = 0


@dataclass(frozen=True, eq=False)  # compared by identity: two pulls may reserve the same numbers
class _Reservation:
    """Room held for a pull in flight in this process: its model, the blobs it counts on, bytes to come (in
    the quota; on the disk, less what partial files hold)."""

    model: str
    blobs: frozenset[str]
    missing: int
    to_write: int


class BlobsVanished(Exception):
    """A blob a pull relied on was deleted before the pull committed (evicted by another process)."""


class Cache:
    def __init__(self, root: Path, max_bytes: int, *, read_only: bool = False) -> None:
        self.read_only = read_only  # `_read_only`: nothing below `root` is created, cleaned, locked or written
        self.root, self.max_bytes = root, max_bytes
        if not read_only:
            root.mkdir(parents=True, exist_ok=True)
        self.index = Index(root / "index.sqlite", read_only=read_only)
        self.blobs = BlobStore(root, digests=self.index, read_only=read_only)
        self.snapshots = Snapshots(root, self.blobs, read_only=read_only)
        if not read_only:
            _clean_up_after_crashes(root)
        self._lock = threading.RLock()
        # Pulls in flight in this process: their blobs and bytes are spoken for.
        self._reservations: set[_Reservation] = set()

    def close(self) -> None:
        self.index.close()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if self.read_only:  # every change of what is cached passes here
            raise _read_only.refused("changing the cache")
        with self._lock, self.blobs.lock("cache"):
            yield

    # --- reading -------------------------------------------------------------------------------------------

    def lookup(self, air: AIR) -> IndexEntry | None:
        """The index entry of `air` if its files are all still in place (no network, no hashing)."""
        entry = self.index.get(air.canonical)
        if entry is None:
            return None
        if not self.model_path(entry).exists():
            return None
        if any(not self.blobs.has(sha) for sha in entry.blobs):
            return None
        return entry

    def model_path(self, entry: IndexEntry) -> Path:
        path = Path(entry.path)
        return path if path.is_absolute() else self.snapshots.absolute(entry.path)

    def record(self, air: AIR, entry: IndexEntry) -> ModelRecord:
        path, layout, architecture = self.model_path(entry), entry.layout, entry.architecture
        return ModelRecord(
            air, path, layout, architecture, entry.size_bytes, entry.sha256, entry.kind, entry.trigger_words
        )

    def touch(self, air: AIR) -> None:
        """Note a use (for eviction). On a full disk the note is lost, never the use: a cached model still
        serves (issue 21: a full disk once failed every request here)."""
        try:
            self.index.touch(air.canonical, time.time())
        except sqlite3.OperationalError as exc:
            log.warning("could not note that %s was used: %s", air, exc)

    def claim(self, air: AIR) -> None:
        """An operator pulled or pinned `air`: no request's download may evict it."""
        try:
            self.index.claim(air.canonical)
        except sqlite3.OperationalError as exc:
            log.warning("could not note that %s is the operator's: %s", air, exc)

    def discard(self, air: AIR) -> None:
        """Remove `air` and its blobs no other model uses (a model a request brought in that nothing can use)."""
        with contextlib.suppress(ModelNotFound):
            self.delete(air, lambda _: False)

    def models(self, in_use: Callable[[str], bool]) -> list[CachedModel]:
        return [self._described(e, in_use) for e in self.index.entries()]

    def model(self, air: AIR, in_use: Callable[[str], bool]) -> CachedModel | None:
        entry = self.index.get(air.canonical)
        return None if entry is None else self._described(entry, in_use)

    def _described(self, e: IndexEntry, in_use: Callable[[str], bool]) -> CachedModel:
        return CachedModel(
            air=e.air,
            source=e.source,
            layout=e.layout,
            architecture=e.architecture,
            size_bytes=e.size_bytes,
            added=datetime.fromtimestamp(e.added, UTC),
            last_used=datetime.fromtimestamp(e.last_used, UTC),
            pinned=e.pinned,
            in_use=in_use(e.air),
            path=self.model_path(e),
            sha256=e.sha256,
            kind=e.kind,
            trigger_words=e.trigger_words,
        )

    def used_bytes(self) -> int:
        """The bytes the quota counts: every blob on disk, each distinct content once, and quarantined ones."""
        return sum(self._blob_sizes().values()) + sum(size for _, size in self.blobs.quarantined())

    # --- quota ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reserve(
        self, air: AIR, needs: list[Need], in_use: Callable[[str], bool], *, on_demand: bool = False, floor: int = 0
    ) -> Iterator[None]:
        """Make room for `needs` (evicting if the quota requires it; `on_demand`: only models requests brought
        in) before anything is downloaded, and hold that room until the block ends. Raises QuotaExceeded if
        the model cannot fit, DiskFull if the disk cannot take it and still keep `floor` free."""
        with self._exclusive():
            absent = [n for n in _distinct(needs) if n.sha256 is None or not self.blobs.has(n.sha256)]
            missing = sum(n.size for n in absent)
            to_write = sum(max(0, n.size - n.partial) for n in absent)
            if self.max_bytes:
                self._make_room(air, needs, missing, in_use, on_demand)
            reserved = sum(r.to_write for r in self._reservations)
            check_room(self.root, air, to_write, reserved=reserved, floor=floor)
            blobs = frozenset(n.sha256 for n in needs if n.sha256)
            reservation = _Reservation(air.canonical, blobs, missing, to_write)
            self._reservations.add(reservation)
        try:
            yield
        finally:
            with self._lock:
                self._reservations.discard(reservation)

    def _make_room(
        self, air: AIR, needs: list[Need], missing: int, in_use: Callable[[str], bool], on_demand: bool
    ) -> None:
        on_disk = self._blob_sizes()
        reserved_bytes = sum(r.missing for r in self._reservations)
        entries = [e for e in self.index.entries() if not Path(e.path).is_absolute()]
        kept_models = {r.model for r in self._reservations} | {air.canonical}
        protected = {
            e.air
            for e in entries
            if e.pinned or in_use(e.air) or e.air in kept_models or (on_demand and not e.on_demand)
        }
        wanted = {n.sha256 for n in needs if n.sha256}
        protected_blobs = wanted.union(*(r.blobs for r in self._reservations))
        for e in entries:
            if e.air in protected:
                protected_blobs |= e.blobs
        model_bytes = sum(n.size for n in _distinct(needs))
        untouchable = sum(on_disk.get(sha, 0) for sha in protected_blobs - wanted) + reserved_bytes
        if model_bytes + untouchable > self.max_bytes:
            raise QuotaExceeded(
                f"{air.canonical} needs {format_bytes(model_bytes)}, but the cache quota is "
                f"{format_bytes(self.max_bytes)}, and {format_bytes(untouchable)} of it is pinned, in use, "
                + ("downloading or an operator's" if on_demand else "or downloading")
            )
        quarantined = self.blobs.quarantined()
        used = sum(on_disk.values()) + sum(size for _, size in quarantined) + reserved_bytes
        if used + missing <= self.max_bytes:
            return
        used -= self._collect_orphans(on_disk, protected_blobs)
        for path, size in quarantined:  # kept for an operator to look at, but never at a model's expense
            if used + missing <= self.max_bytes:
                break
            log.info("removing quarantined blob %s to make room for %s", path.name, air)
            path.unlink(missing_ok=True)
            used -= size
        victims = sorted((e for e in entries if e.air not in protected), key=lambda e: e.last_used)
        for victim in victims:
            if used + missing <= self.max_bytes:
                break
            log.info("evicting %s (last used %s) to make room for %s", victim.air, victim.last_used, air)
            used -= self._evict(victim, protected_blobs)
        if used + missing > self.max_bytes:
            raise QuotaExceeded(
                f"{air.canonical} needs {format_bytes(missing)} more, and the cache quota of "
                f"{format_bytes(self.max_bytes)} cannot make room for it"
            )

    def _blob_sizes(self) -> dict[str, int]:
        sizes = {}
        for sha in self.blobs.all_blobs():
            with contextlib.suppress(FileNotFoundError):
                sizes[sha] = self.blobs.size(sha)
        return sizes

    def _evict(self, entry: IndexEntry, keep: set[str]) -> int:
        """Drop a model; the bytes freed (blobs no remaining model uses)."""
        self.index.remove(entry.air)
        self._drop_folder(entry)
        still_used = self.index.referenced_blobs() | keep
        return sum(self.blobs.remove(sha) for sha in entry.blobs - still_used)

    def _collect_orphans(self, on_disk: Mapping[str, int], keep: set[str]) -> int:
        """Delete old blobs that no model names, and stale partial downloads; the blob bytes freed."""
        referenced = self.index.referenced_blobs() | keep
        now = time.time()
        freed = 0
        for sha in set(on_disk) - referenced:
            path = self.blobs.path(sha)
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > UNCLAIMED_GRACE_S:
                    log.info("removing unreferenced blob %s", sha)
                    freed += self.blobs.remove(sha)
        if stale := clean_old_files(self.root / "partial", "*.part", _STALE_PARTIAL_S):
            log.info("removed %d stale partial download(s)", stale)
        return freed

    # --- writing -------------------------------------------------------------------------------------------

    def commit(
        self,
        air: AIR,
        *,
        source: str,
        layout: Layout,
        files: Mapping[str, str],
        metadata: Mapping[str, Any],
        detect: Callable[[Path], Identity],
        on_demand: bool = False,
    ) -> ModelRecord:
        """Build the model's folder from blobs already in place and record it in the index (`on_demand`: for a
        request), with what `detect` says the weights are. Weights that `detect` refuses leave nothing behind:
        their folder and blobs are removed."""
        with self._exclusive():
            missing = [sha for sha in files.values() if not self.blobs.has(sha)]
            if missing:
                raise BlobsVanished(", ".join(missing))
            folder = self.snapshots.build(air.canonical, files)
            path = folder / SINGLE_FILE_NAME if layout is Layout.SINGLE_FILE else folder
            try:
                identity = detect(path)
            except Exception:
                self.snapshots.remove(folder)
                others = {sha for r in self._reservations if r.model != air.canonical for sha in r.blobs}
                for sha in set(files.values()) - self.index.referenced_blobs() - others:
                    self.blobs.remove(sha)
                raise
            sizes = {p: (sha, self.blobs.size(sha)) for p, sha in files.items()}
            digest = files[SINGLE_FILE_NAME] if layout is Layout.SINGLE_FILE else content_digest(files)
            now = time.time()
            entry = IndexEntry(
                air=air.canonical,
                source=source,
                layout=layout,
                architecture=identity.architecture,
                path=self.snapshots.relative(path),
                sha256=digest,
                size_bytes=sum(size for _, size in sizes.values()),
                metadata=with_kind(metadata, identity.kind),
                added=now,
                last_used=now,
                pinned=False,
                files=sizes,
                on_demand=on_demand,
            )
            old = self.index.get(air.canonical)
            self.index.put(entry)
            if old is not None and old.path != entry.path and not Path(old.path).is_absolute():
                self._drop_folder(old)
        what = identity.architecture.label + (" LoRA" if identity.kind is ModelKind.LORA else "")
        log.info("cached %s (%s, %s)", air.canonical, what, format_bytes(entry.size_bytes))
        return self.record(air, entry)

    def register_local(self, entry: IndexEntry) -> None:
        self.index.put(entry)

    def delete(self, air: AIR, in_use: Callable[[str], bool]) -> int:
        """Drop a model; the bytes freed (its blobs that no other model uses)."""
        with self._exclusive():
            entry = self.index.get(air.canonical)
            if entry is None:
                raise ModelNotFound(f"{air.canonical} is not in the cache")
            if Path(entry.path).is_absolute():
                self.index.remove(entry.air)  # a local model: forget it, never touch the user's files
                return 0
            keep: set[str] = set().union(*(r.blobs for r in self._reservations))
            freed = self._evict(entry, keep)
        log.info("deleted %s from the cache (%s freed)", air.canonical, format_bytes(freed))
        return freed

    def quarantine(self, sha256: str, as_checked: FileIdentity) -> Path | None:
        """Move blob `sha256` aside because it failed its check: every model that uses it stops being cached
        (`lookup` finds its files incomplete) until it is fetched again. The models' index rows stay, with their
        pins. Where it went; None if the file changed meanwhile (`BlobStore.quarantine`) or the cache is read-only."""
        if self.read_only:
            return None
        with self._exclusive():
            return self.blobs.quarantine(sha256, as_checked)

    def pin(self, air: AIR, pinned: bool) -> None:
        if not self.index.set_pinned(air.canonical, pinned):
            raise ModelNotFound(f"{air.canonical} is not in the cache")

    def _drop_folder(self, entry: IndexEntry) -> None:
        path = self.model_path(entry)
        self.snapshots.remove(path.parent if entry.layout is Layout.SINGLE_FILE else path)


def _clean_up_after_crashes(root: Path) -> None:
    """Remove what processes killed mid-way left behind: staging folders no live process owns, and memo files
    that were never renamed into place. Safe while other processes use the cache (see _staging.py)."""
    removed = clean_stale(root / "tmp") + clean_old_files(root / "components", "*.tmp")
    removed += clean_old_files(root / "quarantine", "*", _QUARANTINE_KEPT_S)
    if removed:
        log.info("removed %d leftover(s) of interrupted work from %s", removed, root)


def with_kind(metadata: Mapping[str, Any], kind: ModelKind) -> dict[str, Any]:
    """`metadata` as the index keeps it: a LoRA says so (`_index`), a checkpoint as before."""
    return {**metadata, "kind": kind.value} if kind is ModelKind.LORA else dict(metadata)


def _distinct(needs: list[Need]) -> list[Need]:
    seen: set[str] = set()
    result = []
    for need in needs:
        if need.sha256 is None or need.sha256 not in seen:
            result.append(need)
            if need.sha256:
                seen.add(need.sha256)
    return result
