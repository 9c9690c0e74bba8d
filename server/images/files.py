"""The store's files on disk: names the store chooses, and writes that are whole or absent.

Every file is written to a temporary name in the store's own folder (so the rename never crosses a file system),
flushed to the disk (fsync), renamed over its final name in one step, and the folder's entry flushed too: after
a crash an image or its record is either there, complete, or not there at all. Temporary names carry a random
part, so two uploads (or two replicas sharing the volume) never write the same file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".part-"
RECORD_SUFFIX = ".json"
_HEX = re.compile(r"[0-9a-f]{64}")


def is_digest(name: str) -> bool:
    """`name` is a sha256 in lowercase hex: the only names the store gives its images."""
    return _HEX.fullmatch(name) is not None


def image_path(directory: Path, digest: str) -> Path:
    if not is_digest(digest):  # a client's text never becomes a path: only a checked digest does
        raise ValueError("not a sha256 hex digest")
    return directory / digest


def record_path(directory: Path, digest: str) -> Path:
    return image_path(directory, digest).with_suffix(RECORD_SUFFIX)


def open_temp(directory: Path) -> tuple[Path, BinaryIO]:
    """A new file of a name no one else uses, open for writing, in `directory`."""
    path = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    return path, path.open("xb")


def commit(temp: Path, final: Path, file: BinaryIO | None = None) -> None:
    """Make `temp` (written; `file` still open on it, or already closed) the file `final`, durably."""
    if file is not None:
        file.flush()
        os.fsync(file.fileno())
        file.close()
    else:
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
    os.replace(temp, final)
    sync_directory(final.parent)


def write_atomically(final: Path, data: bytes) -> None:
    temp, file = open_temp(final.parent)
    try:
        with file:
            file.write(data)
            commit(temp, final, file)
    finally:
        remove(temp)


def sync_directory(directory: Path) -> None:
    """Flush the folder's entries (a rename is durable only once its folder is)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
