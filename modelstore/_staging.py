"""Staging folders under `<cache>/tmp/`, and the clean-up of those their owners left behind.

A model folder or a built-in model is assembled in a staging folder and renamed into place when complete
(`_snapshots`, `_builtin`). A process killed meanwhile (kill -9, a power cut) leaves its staging folder behind,
and nothing else would ever remove it (issue 13, finding 8: a `tmp/builtin-*` folder survived restarts).

How a folder is known to be abandoned, with other processes using the same cache at the same moment: its owner
holds an exclusive `flock` on it for as long as it works there, and the kernel drops that lock when the owner
dies, however it dies. The owner takes the lock right after creating the folder and then writes a marker file
into it, so a folder whose lock is free and that holds the marker was certainly given up. A folder without the
marker is either brand new (its owner is about to lock it) or older than this scheme (left by an earlier
version): it is removed only once it is an hour old. Opening a store (`clean_stale`) removes what is abandoned.

    <cache>/tmp/builtin-k3j4/            a staging folder (locked while in use)
    <cache>/tmp/builtin-k3j4/.owner      the marker: "pid host"
    <cache>/tmp/builtin-k3j4/model/      what is being built, renamed into place when complete
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_OWNER = ".owner"
# What another process may have just made and not yet claimed is left alone this long: a staging folder without
# its owner's marker, a temporary file before its rename, a blob before the index names it (`_cache`).
UNCLAIMED_GRACE_S = 3600.0


@contextlib.contextmanager
def staging_folder(tmp: Path, prefix: str) -> Iterator[Path]:
    """A new folder under `tmp`, locked by this process while the block runs and removed when it ends. Build
    inside it, in a subfolder of your own, and rename that into place."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Blocking: a cleaner may hold the lock for a moment while it looks at a folder with no marker yet.
        fcntl.flock(fd, fcntl.LOCK_EX)
        (folder / _OWNER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # before the lock goes: nobody else may see it half-removed
        os.close(fd)


def clean_stale(tmp: Path) -> int:
    """Remove the staging folders under `tmp` that no live process owns; how many were removed."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(tmp.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and _remove_if_abandoned(entry):
                removed += 1
    return removed


def clean_old_files(folder: Path, pattern: str, older_than_s: float = UNCLAIMED_GRACE_S) -> int:
    """Remove files matching `pattern` in `folder` last changed more than `older_than_s` ago (temporary files
    written before a rename, whose writer is long gone); how many were removed."""
    removed = 0
    now = time.time()
    for path in folder.glob(pattern):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
    return removed


def _remove_if_abandoned(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False  # gone meanwhile, or not ours to open
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner is at work
        try:
            claimed = (folder / _OWNER).exists()
            age = time.time() - os.fstat(fd).st_mtime
        except OSError:
            return False
        if not claimed and age < UNCLAIMED_GRACE_S:
            return False
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s: a staging folder left by a process that ended before finishing", folder.name)
        return not folder.exists()
    finally:
        os.close(fd)
