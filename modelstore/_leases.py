"""Which models are in use, across every process that shares a cache.

Within a process a lease is a counter. Across processes it is a shared `flock` on one small file per model,
`<cache>/leases/<sha256 of the canonical AIR>`, named by a hash so that no identifier ever becomes a path. A
process holds the shared lock while any of its leases on the model is open; another process asks whether the
model is in use by trying an exclusive lock without waiting. The kernel drops a process's locks when it dies,
so a crash never leaves a model held.

flock is advisory and does nothing on some network file systems; there only a process's own leases protect a
model, as before. The check is made at eviction or deletion time: a lease taken by another process a moment
later is not seen, the same window any cache shared without a lock server has.

On a read-only cache (`_read_only`) nothing can be deleted or evicted, and no lock file can be made: leases are
counters in this process only (`shared=False`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


class Leases:
    def __init__(self, folder: Path, *, shared: bool = True) -> None:
        if shared:
            folder.mkdir(parents=True, exist_ok=True)
        self._shared = shared
        self._folder = folder
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._fds: dict[str, int] = {}  # model -> the file holding this process's shared lock

    def acquire(self, model: str) -> None:
        """One more lease on `model` (a canonical AIR) in this process."""
        with self._lock:
            self._counts[model] += 1
            if self._counts[model] == 1 and self._shared:
                fd = os.open(self._path(model), os.O_RDWR | os.O_CREAT, 0o664)
                # Waits only while another process checks this model (an instant, never a hold).
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._fds[model] = fd

    def release(self, model: str) -> None:
        with self._lock:
            if self._counts[model] <= 0:
                raise ValueError(f"{model} was released more often than acquired")
            self._counts[model] -= 1
            if not self._counts[model]:
                del self._counts[model]
                if model in self._fds:
                    os.close(self._fds.pop(model))  # drops this process's shared lock

    @contextlib.contextmanager
    def held(self, model: str) -> Iterator[None]:
        """A lease on `model` for the duration of the block."""
        self.acquire(model)
        try:
            yield
        finally:
            self.release(model)

    def held_here(self, model: str) -> bool:
        with self._lock:
            return self._counts[model] > 0

    def held_anywhere(self, model: str) -> bool:
        """Whether this process or another one holds a lease on `model`."""
        if self.held_here(model) or not self._shared:
            return self.held_here(model)
        try:
            fd = os.open(self._path(model), os.O_RDONLY)
        except FileNotFoundError:
            return False  # nobody ever leased it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # another process holds a shared lock
        finally:
            os.close(fd)  # closing also drops the exclusive lock if it was granted
        return False

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._counts.clear()

    def _path(self, model: str) -> Path:
        return self._folder / hashlib.sha256(model.encode()).hexdigest()
