"""The disk under the cache (issue 21, item 4): room checked before a download, and a full disk turned into
`DiskFull`, a clear and retryable error, wherever the store writes.

Before a model's first byte is requested, the disk must hold what is still to be written: the files not yet
in the cache less what their partial files already hold (a resumed download needs only the rest), plus
what this process's other downloads will still write, plus, for a download a request caused, the operator's
free-space floor. A disk can still fill up meanwhile (another process, a log): the write's ENOSPC, or
SQLite's "database or disk is full", becomes `DiskFull` at the store's front door. The partial file is kept,
so the download resumes once space returns; nothing stays broken, so the condition clears by itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from modelstore.air import AIR
from modelstore.errors import DiskFull
from modelstore.units import format_bytes

log = logging.getLogger(__name__)

_FULL = (errno.ENOSPC, errno.EDQUOT)
_WHAT = "the disk holding the model cache"


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or the user's disk quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


@contextlib.contextmanager
def disk_full_as_error(root: Path, air: AIR) -> Iterator[None]:
    """A full disk met in the block leaves it as `DiskFull` about `air` (the path goes to the log only)."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        log.warning("%s: the disk holding %s is full (%s); what was received is kept", air, root, exc)
        raise DiskFull(
            f"{air.canonical}: {_WHAT} is full; what was received is kept and the download resumes once space is freed",
            air=air.canonical,
        ) from None


def check_room(root: Path, air: AIR, to_write: int, *, reserved: int, floor: int) -> None:
    """DiskFull unless the disk under `root` takes `to_write` more bytes beside `reserved` (what other downloads
    will still write) and still has `floor` free."""
    free = shutil.disk_usage(root).free
    if to_write + reserved + floor <= free:
        return
    needs = f"{air.canonical} needs {format_bytes(to_write)} more"
    if reserved:
        needs += f" (and downloads under way {format_bytes(reserved)})"
    kept = f", and downloads for requests leave {format_bytes(floor)} free" if floor else ""
    raise DiskFull(f"{needs}, but {_WHAT} has {format_bytes(free)} free{kept}", air=air.canonical)
