"""The content-addressed blob store: every file of every cached model, named by its SHA256.

    <cache>/blobs/sha256/ab/abcdef…   one file per distinct content, read-only once in place
    <cache>/partial/<key>.part        a download in progress, kept across failures and restarts
    <cache>/locks/<key>.lock          who may write <key>.part right now (a file lock)
    <cache>/quarantine/<sha256>       a blob that no longer holds what its name says, moved aside

A blob enters only by `adopt`: its bytes were hashed (and, for weights, their safetensors header checked)
before an fsync and an atomic rename put it in place, so a blob's name told the truth about its content when
it entered; its fast digest, taken from the same verified bytes, is recorded then (`_digests`). A crash at any
moment leaves either no blob or a whole one; a partial file is keyed by what it will become (the expected
SHA256), so the next attempt, in this process or after a restart, resumes it.

Disks flip bits and people edit files, so a blob is checked again before each process first uses it
(`_integrity`). The store remembers which blobs this process has checked, with their file's identity (device,
inode, size, modification and change times): a file rewritten since is checked again. One that fails is
moved to `quarantine/` in one rename, so no model uses it any more, and is fetched again.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

from filelock import FileLock, Timeout

from modelstore._safetensors_header import parse_header
from modelstore.errors import UnsafeCheckpoint

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PARTIAL_KEY = re.compile(r"[0-9a-z\-]{3,80}")
_LOCK_POLL_S = 0.25


class FileIdentity(NamedTuple):
    """What changes when a file is replaced or written to: compared, never interpreted."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def identity(path: Path) -> FileIdentity:
    return identity_of(path.stat())


def identity_of(st: os.stat_result) -> FileIdentity:
    """The identity of a file as stat (or fstat, of what was opened) saw it."""
    return FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DigestRecord(Protocol):
    """Where a blob's fast digest is kept (the index)."""

    def record_fast_digest(self, sha256: str, size: int, fast: str) -> None: ...


class BlobStore:
    def __init__(self, root: Path, digests: DigestRecord, *, read_only: bool = False) -> None:
        self.root = root
        self._blobs = root / "blobs" / "sha256"
        self._partial = root / "partial"
        self._locks = root / "locks"
        self._quarantine = root / "quarantine"
        self._digests = digests
        # Blobs this process has checked (or verified on their way in), as the files were then.
        self._checked: dict[str, FileIdentity] = {}
        self._checked_lock = threading.Lock()
        for folder in () if read_only else (self._blobs, self._partial, self._locks):
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self._blobs / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def partial_path(self, key: str) -> Path:
        if not _PARTIAL_KEY.fullmatch(key):
            raise ValueError(f"malformed partial key {key!r}")
        return self._partial / f"{key}.part"

    def partial_size(self, key: str) -> int:
        try:
            return self.partial_path(key).stat().st_size
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def lock(self, key: str, *, while_waiting: Callable[[], None] | None = None) -> Iterator[None]:
        """Exclusive, across threads and processes, for writing `key` (a partial file, or "cache").
        `while_waiting` is called every fraction of a second until the lock is ours.

        flock is advisory and a no-op on some network file systems; correctness never depends on it (hashes
        are verified and renames are atomic), it only stops two processes from downloading the same bytes."""
        if not _PARTIAL_KEY.fullmatch(key):
            raise ValueError(f"malformed lock key {key!r}")
        lock = FileLock(self._locks / f"{key}.lock", mode=0o664)
        while True:
            try:
                lock.acquire(timeout=-1 if while_waiting is None else _LOCK_POLL_S)
                break
            except Timeout:
                assert while_waiting is not None
                while_waiting()
        try:
            yield
        finally:
            lock.release()

    def adopt(self, source: Path, sha256: str, *, fast_digest: str, check_safetensors_as: str | None = None) -> Path:
        """Move the verified file `source` in as blob `sha256` (same file system); return the blob path.

        `fast_digest` (of the same verified bytes) is recorded for the checks before later uses. With
        `check_safetensors_as` (a label for messages) the file must be a well-formed safetensors file: a
        pickle or a corrupt header raises UnsafeCheckpoint, the file is deleted and nothing enters."""
        if check_safetensors_as is not None:
            try:
                check_safetensors(source, check_safetensors_as)
            except UnsafeCheckpoint:
                source.unlink(missing_ok=True)
                raise
        target = self.path(sha256)
        if target.is_file():
            # Same content is already here (another model, or another process won the race): keep one copy.
            source.unlink(missing_ok=True)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as f:
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        os.chmod(source, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        # Before the rename: a blob in place always has its digest (a row without its blob is harmless).
        self._digests.record_fast_digest(sha256, size, fast_digest)
        os.replace(source, target)
        fsync_dir(target.parent)
        self.mark_checked(sha256, identity(target))  # its bytes were verified on their way in
        return target

    def is_checked(self, sha256: str, as_now: FileIdentity) -> bool:
        """Whether this process checked blob `sha256` when its file was as it is `as_now`."""
        with self._checked_lock:
            return self._checked.get(sha256) == as_now

    def mark_checked(self, sha256: str, as_then: FileIdentity) -> None:
        with self._checked_lock:
            self._checked[sha256] = as_then

    def is_quarantined(self, sha256: str) -> bool:
        return (self._quarantine / self.path(sha256).name).is_file()

    def quarantine(self, sha256: str, as_checked: FileIdentity) -> Path | None:
        """Move blob `sha256` aside (it failed its check) in one rename; where it went. None if the file is no
        longer the one that was checked (gone, or replaced meanwhile by another process's fresh copy)."""
        path = self.path(sha256)
        try:
            if identity(path) != as_checked:
                return None
        except FileNotFoundError:
            return None
        self._quarantine.mkdir(exist_ok=True)
        target = self._quarantine / sha256
        os.replace(path, target)
        fsync_dir(path.parent)
        with contextlib.suppress(OSError):
            os.utime(target)  # kept for a week from now, whenever it was downloaded
        with self._checked_lock:
            self._checked.pop(sha256, None)
        return target

    def quarantined(self) -> list[tuple[Path, int]]:
        """Blobs set aside and their sizes, oldest first: counted by the quota and the bytes on disk."""
        found = []
        for path in self._quarantine.glob("*") if self._quarantine.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                found.append((st.st_mtime, path, st.st_size))
        return [(path, size) for _, path, size in sorted(found)]

    def remove(self, sha256: str) -> int:
        """Delete a blob; the bytes freed (0 if it was not there)."""
        path = self.path(sha256)
        with self._checked_lock:
            self._checked.pop(sha256, None)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def all_blobs(self) -> Iterator[str]:
        if not self._blobs.is_dir():
            return
        for shard in self._blobs.iterdir():
            if shard.is_dir():
                for blob in shard.iterdir():
                    if _SHA256.fullmatch(blob.name):
                        yield blob.name


def check_safetensors(path: Path, label: str) -> None:
    """Raise UnsafeCheckpoint unless `path` is a well-formed safetensors file (by content, never by name)."""
    with path.open("rb") as f:
        parse_header(f, os.fstat(f.fileno()).st_size, name=label)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable: without it a power cut can undo a rename we reported as done."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
