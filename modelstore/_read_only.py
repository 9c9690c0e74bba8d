"""A read-only cache (`StoreSettings.read_only`): a volume filled once (a pull Job, an init container, a model
image) and mounted read-only by every replica, so a new replica starts warm (issue 20).

What the store does then, and never writes a byte of the volume for:

- the index is opened read-only and `immutable` (SQLite then takes no lock and creates no `-shm`/`-wal`, which
  a read-only mount could not hold). `immutable` reads the main database file only: a write-ahead log left by
  a writer that never checkpointed (a pull Job killed before it closed the index) would be ignored, so when
  one is there the index and its log are copied to a private temporary folder and opened there, where SQLite
  recovers the log's commits;
- a model's last use and the fast digests it learns are kept in memory (`Index`), leases are counters in
  this process (`Leases(shared=False)`: no lock files), component measurements are not memoised on disk;
- it serves every model in the volume, after the same first-use check of its files (reads only). A model that
  is missing, a pull, delete, pin or repair is `ReadOnlyCache` (FAILED_PRECONDITION at the gRPC edge): the
  one place that writes the volume is where it is filled.

A damaged file is reported, never moved aside: the model fails with `ReadOnlyCache` naming the file, and the
fix is a pull (or `refinery models verify`) where the volume is writable.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import urllib.parse
from pathlib import Path

from modelstore.errors import ReadOnlyCache

SETTING = "REFINERY_CACHE_READ_ONLY"
HOW_TO_FILL = "pull it into the shared volume where it is filled (the pull Job: refinery models pull)"


def refused(what: str, air: str | None = None) -> ReadOnlyCache:
    """The error for `what` (a pull, a delete, ...) asked of a read-only cache."""
    return ReadOnlyCache(f"{what}: the model cache is read-only ({SETTING}); {HOW_TO_FILL}", air=air)


def not_cached(canonical: str) -> ReadOnlyCache:
    return ReadOnlyCache(f"{canonical} is not in the read-only model cache; {HOW_TO_FILL}", air=canonical)


def damaged(canonical: str, damage: str) -> ReadOnlyCache:
    return ReadOnlyCache(
        f"{canonical}: {damage}; the model cache is read-only, so it cannot be set aside or fetched again here: "
        f"{HOW_TO_FILL}",
        air=canonical,
    )


def connect(path: Path) -> tuple[sqlite3.Connection, Path | None]:
    """A read-only connection to the index at `path`, and the private folder holding a copy of it if one was
    needed (the caller removes it on close)."""
    if not path.is_file():
        raise ReadOnlyCache(
            f"{path.parent} holds no model cache (no {path.name}); with {SETTING} the cache must be filled first: "
            "refinery models pull --cache-dir ... where the volume is writable"
        )
    wal = path.with_name(path.name + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        private = Path(tempfile.mkdtemp(prefix="refinery-index-"))
        shutil.copy2(path, private / path.name)
        shutil.copy2(wal, private / wal.name)
        db = sqlite3.connect(private / path.name, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA query_only = ON")
        return db, private
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1"
    db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    return db, None
