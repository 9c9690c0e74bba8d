"""Cached weights are what their names say (issue 13, finding 3): checks of a model's blobs before a process
first uses it, the full check behind `refinery models verify`, and quarantine.

- `check` (before first use; `resolve`, `lookup`, `pull`): each blob of the model that this process has not
  checked yet, or whose file changed since (`BlobStore.is_checked`), is read in full and its fast digest
  compared with the one recorded when it entered the cache (`_digests`: a tenth of SHA256's CPU cost). A blob
  that entered before fast digests were kept has its SHA256 checked instead, once, and its fast digest
  recorded. `pull` checks every blob again, whatever this process checked before.
- `verify` (`refinery models verify`): every blob's SHA256 against its name, which is the hash the source
  published.

A blob that fails either is moved to `<cache>/quarantine/` in one rename (`Cache.quarantine`); every model
that uses it is then no longer cached, and the next `resolve` fetches it again where its source allows (a
download, or a rebuild for the built-in models). Messages name the file inside the model folder, never a
path on the server's disk; the log line names where the blob went.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from modelstore import _read_only
from modelstore._blobs import BlobStore, FileIdentity, identity
from modelstore._cache import Cache
from modelstore._digests import fast_digest, full_digests
from modelstore._index import IndexEntry
from modelstore.air import AIR, Source, parse_stored_air
from modelstore.errors import IntegrityError, ModelStoreError
from modelstore.progress import ByteCounter, ProgressCallback, ProgressFanout
from modelstore.record import ModelKind, Verdict, Verification
from modelstore.settings import StoreSettings

log = logging.getLogger(__name__)

_CHANGED = "changed since it entered the cache (its digest does not match)"
OFFLINE = "it was set aside, and downloads are turned off (offline mode): pull it again once they are on"


def damaged_offline(air: AIR, damage: str) -> IntegrityError:
    """`air`'s files failed their check (`damage`, what failed) and offline mode forbids fetching them again."""
    return IntegrityError(f"{air.canonical}: {damage}; {OFFLINE}", air=air.canonical)


def refetchable(settings: StoreSettings, air: AIR) -> bool:
    """Whether a model whose files failed their check may be fetched again: a built-in one is rebuilt, a
    download needs the network; a read-only cache holds what it holds."""
    return not settings.read_only and (air.source is Source.BUILTIN or not settings.offline)


def still_damaged(air: AIR, fetches: int) -> NoReturn:
    raise IntegrityError(
        f"{air.canonical}: its files failed their check again after being fetched {fetches} times",
        air=air.canonical,
    )


@dataclass(frozen=True)
class Damage:
    """A blob that failed its check: the files of the model it backs, what was wrong, where it went."""

    sha256: str
    files: tuple[str, ...]  # paths inside the model folder
    problem: str
    quarantined: Path | None  # None: it was missing, or another process replaced it meanwhile

    def describe(self) -> str:
        return f"{', '.join(self.files)} {self.problem}"


class BlobChecks:
    """The checks of one store's cache. Thread-safe: a blob is checked by one thread at a time, and the others
    that need it wait for that check rather than read it again."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def check(
        self,
        entry: IndexEntry,
        progress: ProgressCallback | None,
        *,
        again: bool = False,
        later: Collection[str] = (),
    ) -> list[Damage]:
        """Check the fast digests of `entry`'s blobs that this process has not checked as they are now (all of
        them with `again`), but those in `later` (checked by the read that loads them: `settle_read`);
        `progress` hears the reading as VERIFYING progress. What failed (quarantined)."""
        blobs = self._cache.blobs
        left = set(later)
        todo = {
            sha: n for sha, n in _blob_sizes(entry).items() if sha not in left and (again or not _checked(blobs, sha))
        }
        if not todo:
            return []
        return self._run(entry, todo, progress, lambda sha, counter: self._check_blob(sha, counter, again=again))

    def deferrable(self, entry: IndexEntry, defer: bool = True) -> dict[str, str]:
        """The weight files of `entry` (path in the model folder -> blob) whose check the read that loads them
        can make (none without `defer`, none of a LoRA): safetensors files whose blob has a fast digest
        recorded and is not checked as it is now."""
        if not defer or entry.kind is ModelKind.LORA:
            return {}
        blobs, index = self._cache.blobs, self._cache.index
        return {
            path: sha
            for path, (sha, _) in entry.files.items()
            if path.endswith(".safetensors") and index.fast_digest(sha) is not None and not _checked(blobs, sha)
        }

    def is_checked(self, sha: str, as_now: FileIdentity) -> bool:
        return self._cache.blobs.is_checked(sha, as_now)

    def settle_read(self, entry: IndexEntry, sha: str, as_read: FileIdentity, digest: str) -> Damage | None:
        """The verdict on one whole read of blob `sha` (the file as it was opened: `as_read`) that hashed to
        `digest`: checked, or quarantined (and logged) as a failed `check` would be. What failed, if it did."""
        recorded = self._cache.index.fast_digest(sha)
        if recorded is None:  # only blobs with a fast digest are left to their load: never here
            raise IntegrityError(f"{sha} has no fast digest to be checked against", air=entry.air)
        size, expected = recorded
        problem = _size_problem(as_read.size, size) if as_read.size != size else None
        if problem is None and digest != expected:
            problem = _CHANGED
        with self._lock(sha):
            return self._verdict(entry, sha, as_read, problem)

    def check_owed(self, entry: IndexEntry, shas: Collection[str]) -> list[Damage]:
        """Check those of `shas` (blobs of `entry` left to their load) that are still not checked: the ones the
        load did not read, or not to the end. What failed (quarantined)."""
        blobs = self._cache.blobs
        todo = {sha: size for sha, size in _blob_sizes(entry).items() if sha in shas and not _checked(blobs, sha)}
        if not todo:
            return []
        return self._run(entry, todo, None, lambda sha, counter: self._check_blob(sha, counter, again=False))

    def verify(
        self, entry: IndexEntry, progress: ProgressCallback | None, done: dict[str, Damage | None]
    ) -> tuple[int, list[Damage]]:
        """Check the SHA256 of every blob of `entry` (those not in `done`, the results of this run so far);
        (bytes read, what failed)."""
        todo = {sha: size for sha, size in _blob_sizes(entry).items() if sha not in done}
        damages = self._run(entry, todo, progress, lambda sha, counter: self._full_check(sha, counter))
        failed = {d.sha256: d for d in damages}
        done.update({sha: failed.get(sha) for sha in todo})
        earlier = [d for sha in _blob_sizes(entry) if sha not in todo and (d := done[sha]) is not None]
        return sum(todo.values()), earlier + damages

    def _run(
        self,
        entry: IndexEntry,
        todo: dict[str, int],
        progress: ProgressCallback | None,
        check_one: Callable[[str, ByteCounter], str | None],
    ) -> list[Damage]:
        reading = ProgressFanout(entry.air)
        reading.set_verifying()
        if progress is not None:
            reading.subscribe(progress)
        reading.set_total(sum(todo.values()))
        damages = []
        for sha in sorted(todo):
            with self._lock(sha):
                damage = self._judge(entry, sha, check_one, reading)
            if damage is not None:
                damages.append(damage)
        reading.finish()
        return damages

    def _judge(
        self, entry: IndexEntry, sha: str, check_one: Callable[[str, ByteCounter], str | None], reading: ByteCounter
    ) -> Damage | None:
        blobs = self._cache.blobs
        try:
            as_read = identity(blobs.path(sha))
        except FileNotFoundError:
            gone = "failed its check earlier" if blobs.is_quarantined(sha) else "is missing from the cache"
            return Damage(sha, _files_of(entry, sha), gone, None)
        return self._verdict(entry, sha, as_read, check_one(sha, reading))

    def _verdict(self, entry: IndexEntry, sha: str, as_read: FileIdentity, problem: str | None) -> Damage | None:
        if problem is None:
            self._cache.blobs.mark_checked(sha, as_read)
            return None
        moved = self._cache.quarantine(sha, as_read)
        damage = Damage(sha, _files_of(entry, sha), problem, moved)
        if moved is not None:
            log.warning("%s: %s; the blob was moved to %s", entry.air, damage.describe(), moved)
        return damage

    def _check_blob(self, sha: str, counter: ByteCounter, *, again: bool) -> str | None:
        """What is wrong with blob `sha` by its fast digest (None: nothing)."""
        path = self._cache.blobs.path(sha)
        if not again and _checked(self._cache.blobs, sha):
            return None  # another thread checked it while this one waited for the lock
        recorded = self._cache.index.fast_digest(sha)
        if recorded is None:
            return self._full_check(sha, counter)  # it entered before fast digests were kept
        size, expected = recorded
        actual_size = path.stat().st_size
        if actual_size != size:
            return _size_problem(actual_size, size)
        if fast_digest(path, counter) != expected:
            return _CHANGED
        return None

    def _full_check(self, sha: str, counter: ByteCounter) -> str | None:
        """What is wrong with blob `sha` by its SHA256 (None: nothing; its fast digest is recorded then)."""
        path = self._cache.blobs.path(sha)
        actual, fast = full_digests(path, counter)
        if actual != sha:
            return f"does not match its SHA256 (the file now hashes to {actual})"
        self._cache.index.record_fast_digest(sha, path.stat().st_size, fast)
        return None

    def _lock(self, sha: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(sha, threading.Lock())


def _size_problem(actual: int, recorded: int) -> str:
    return f"holds {actual} bytes instead of the {recorded} it had when it entered the cache"


def verification(
    checks: BlobChecks,
    entry: IndexEntry,
    progress: ProgressCallback | None,
    done: dict[str, Damage | None],
    settings: StoreSettings,
    fetch: Callable[[], object],
) -> Verification:
    """`ModelStore.verify` of one cached model (`entry`): every blob's SHA256 (those not in `done`), and what
    failed fetched again (`fetch`) where the settings allow (`refetchable`)."""
    air = entry.air
    read, damages = checks.verify(entry, progress, done)
    if not damages:
        return Verification(air, Verdict.INTACT, read, "")
    damage = describe(damages)
    if not refetchable(settings, parse_stored_air(air)):
        why = _read_only.damaged(air, damage).message if settings.read_only else f"{damage}; {OFFLINE}"
        return Verification(air, Verdict.CORRUPT, read, why)
    log.warning("%s: %s; fetching it again", air, damage)
    try:
        fetch()
    except ModelStoreError as exc:
        failed = f"{damage}; it was set aside, and fetching it again failed: {exc.message}"
        return Verification(air, Verdict.CORRUPT, read, failed)
    return Verification(air, Verdict.REPAIRED, read, f"{damage}; fetched again and verified")


def describe(damages: Iterable[Damage]) -> str:
    return "; ".join(d.describe() for d in damages)


def quarantined_files(cache: Cache, entry: IndexEntry) -> list[str]:
    """The files of `entry`'s model whose blobs are in quarantine rather than in the cache."""
    blobs = cache.blobs
    return sorted(path for path, (sha, _) in entry.files.items() if not blobs.has(sha) and blobs.is_quarantined(sha))


def _checked(blobs: BlobStore, sha: str) -> bool:
    try:
        as_now = identity(blobs.path(sha))
    except FileNotFoundError:
        return False
    return blobs.is_checked(sha, as_now)


def _blob_sizes(entry: IndexEntry) -> dict[str, int]:
    return {sha: size for sha, size in entry.files.values()}


def _files_of(entry: IndexEntry, sha: str) -> tuple[str, ...]:
    return tuple(sorted(path for path, (blob, _) in entry.files.items() if blob == sha))
