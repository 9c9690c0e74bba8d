"""The cache's index: one SQLite database (WAL) that says which models are cached, from where, and which blobs
make them up.

    models(air, source, layout, architecture, path, sha256, size_bytes, metadata, added, last_used, pinned)
    model_files(air, path, sha256, size)    -- the blobs of a cached model, by path inside its folder
    blob_digests(sha256, size, fast)        -- each blob's fast digest, taken from its verified bytes (_digests.py)
    on_demand(air)                          -- models only requests brought in: the ones their downloads may evict

A row is written only after every blob it names is in place and its folder is built, in one transaction, so
the index never points at something that is not there (at worst, after a crash, a blob or a folder exists that
no row names yet; the next pull of that model reuses it). WAL lets many readers (every request's `resolve`)
proceed while one writer commits, across threads and processes sharing the cache folder. On a read-only cache
(`_read_only`) nothing is written: uses and learnt digests stay in this process's memory.

A blob's digest row depends only on its content, so it never goes stale: it may outlive its blob and serves
again if the same content returns. Tables added after schema version 1 are created when missing, without a
new version number, so an older store sharing the folder still opens it (and ignores them).

Metadata is the source's description of the model (ids, names, hashes): never tokens or presigned URLs. It
also holds what the schema had no column for when it came, so that an older store sharing the folder reads
the rows as before: `kind` ("lora" for a LoRA; absent for a checkpoint) and `triggerWords` (a LoRA's). An
architecture named after the schema (SDXL inpainting) is written as "unknown" in its column, which is what an
older store reading the same weights would say (and all its enumeration can read), and by name in metadata
`architecture`, which this store reads first.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelstore import _read_only
from modelstore.errors import ReadOnlyCache
from modelstore.record import Architecture, Layout, ModelKind

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    air          TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    layout       TEXT NOT NULL,
    architecture TEXT NOT NULL,
    path         TEXT NOT NULL,  -- relative to the cache folder, or absolute for local models (not ours)
    sha256       TEXT NOT NULL,
    size_bytes   INTEGER NOT NULL,
    metadata     TEXT NOT NULL,  -- JSON
    added        REAL NOT NULL,  -- unix time
    last_used    REAL NOT NULL,
    pinned       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS model_files (
    air    TEXT NOT NULL REFERENCES models(air) ON DELETE CASCADE,
    path   TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size   INTEGER NOT NULL,
    PRIMARY KEY (air, path)
);
CREATE INDEX IF NOT EXISTS model_files_by_blob ON model_files(sha256);
"""
_ADDITIONS = """
CREATE TABLE IF NOT EXISTS blob_digests (
    sha256 TEXT PRIMARY KEY,
    size   INTEGER NOT NULL,
    fast   TEXT NOT NULL      -- XXH3-128, hex
);
CREATE TABLE IF NOT EXISTS on_demand (
    air TEXT PRIMARY KEY      -- a row of models that only requests (never an operator) have fetched
);
"""


# What the `architecture` column may hold: the architectures every store sharing a folder knows.
_COLUMN_ARCHITECTURES = frozenset(
    {
        Architecture.SDXL_BASE,
        Architecture.SDXL_REFINER,
        Architecture.SD1,
        Architecture.SD2,
        Architecture.SD3,
        Architecture.FLUX,
        Architecture.UNKNOWN,
    }
)
_ARCHITECTURE_KEY = "architecture"


@dataclass(frozen=True)
class IndexEntry:
    air: str  # canonical
    source: str
    layout: Layout
    architecture: Architecture
    path: str
    sha256: str
    size_bytes: int
    metadata: Mapping[str, Any]
    added: float
    last_used: float
    pinned: bool
    # path inside the model folder -> (blob sha256, size); empty for local models.
    files: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    # Fetched for requests only: their downloads may evict it. An operator's pull or pin makes it theirs.
    on_demand: bool = False

    @property
    def blobs(self) -> set[str]:
        return {sha for sha, _ in self.files.values()}

    @property
    def kind(self) -> ModelKind:
        return ModelKind(self.metadata.get("kind", ModelKind.CHECKPOINT.value))

    @property
    def trigger_words(self) -> tuple[str, ...]:
        words = self.metadata.get("triggerWords")
        return tuple(w for w in words if isinstance(w, str)) if isinstance(words, list) else ()


class Index:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self._lock = threading.Lock()
        self.read_only = read_only
        # Read-only (`_read_only`): what would be written is kept here, in memory, for this process.
        self._last_used: dict[str, float] = {}
        self._fast: dict[str, tuple[int, str]] = {}
        self._private: Path | None = None
        if read_only:
            self._db, self._private = _read_only.connect(path)
            self._check_schema(path)
            return
        # One connection shared by this process's threads (serialised by _lock); autocommit, with explicit
        # transactions for every multi-statement write.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=60.0)
        self._db.execute("PRAGMA busy_timeout = 60000")
        self._db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL loses at most the last commits on power loss, never consistency; each `resolve`
        # writes last_used, and a full fsync per request would cost more than the lookup itself.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._transaction() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"{path} was written by a newer version (schema {version})")
            if version < _SCHEMA_VERSION:
                # Statement by statement: executescript() would commit the transaction we are in.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            for statement in _ADDITIONS.split(";"):
                if statement.strip():
                    db.execute(statement)

    def _check_schema(self, path: Path) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version != _SCHEMA_VERSION or not {"models", "model_files", "blob_digests", "on_demand"} <= tables:
            self._db.close()
            raise ReadOnlyCache(
                f"{path} has schema {version} without all of this version's tables; open the cache once where "
                "it is writable (refinery models list --cache-dir ...) to bring it up to date"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._private is not None:
                shutil.rmtree(self._private, ignore_errors=True)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise _read_only.refused("changing the index")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, air: str) -> IndexEntry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM models WHERE air = ?", (air,)).fetchone()
            if row is None:
                return None
            files = self._db.execute("SELECT path, sha256, size FROM model_files WHERE air = ?", (air,)).fetchall()
            on_demand = self._db.execute("SELECT 1 FROM on_demand WHERE air = ?", (air,)).fetchone() is not None
        return self._used(_entry(row, files, on_demand))

    def entries(self) -> list[IndexEntry]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM models ORDER BY air").fetchall()
            files = self._db.execute("SELECT air, path, sha256, size FROM model_files").fetchall()
            on_demand = {air for (air,) in self._db.execute("SELECT air FROM on_demand")}
        by_air: dict[str, list[tuple[str, str, int]]] = {}
        for air, path, sha256, size in files:
            by_air.setdefault(air, []).append((path, sha256, size))
        return [self._used(_entry(row, by_air.get(row[0], []), row[0] in on_demand)) for row in rows]

    def _used(self, entry: IndexEntry) -> IndexEntry:
        when = self._last_used.get(entry.air)
        return entry if when is None else dataclasses.replace(entry, last_used=max(when, entry.last_used))

    def put(self, entry: IndexEntry) -> None:
        """Insert or replace `entry` and its files in one transaction; `added` and `pinned` of an existing row
        are kept (re-pulling a model does not unpin it), and so is an operator's claim on it (a request that
        fetches an operator's model again does not make it evictable by requests)."""
        with self._transaction() as db:
            old = db.execute("SELECT added, pinned FROM models WHERE air = ?", (entry.air,)).fetchone()
            added, pinned = (old[0], bool(old[1]) or entry.pinned) if old else (entry.added, entry.pinned)
            was_on_demand = db.execute("SELECT 1 FROM on_demand WHERE air = ?", (entry.air,)).fetchone()
            if not entry.on_demand or (old is not None and was_on_demand is None):
                db.execute("DELETE FROM on_demand WHERE air = ?", (entry.air,))
            else:
                db.execute("INSERT OR IGNORE INTO on_demand VALUES (?)", (entry.air,))
            db.execute("DELETE FROM model_files WHERE air = ?", (entry.air,))
            db.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.air,
                    entry.source,
                    entry.layout.value,
                    _column_architecture(entry.architecture),
                    entry.path,
                    entry.sha256,
                    entry.size_bytes,
                    json.dumps(_stored_metadata(entry), sort_keys=True),
                    added,
                    entry.last_used,
                    int(pinned),
                ),
            )
            db.executemany(
                "INSERT INTO model_files VALUES (?, ?, ?, ?)",
                [(entry.air, path, sha256, size) for path, (sha256, size) in entry.files.items()],
            )

    def touch(self, air: str, when: float) -> None:
        with self._lock:
            if self.read_only:
                self._last_used[air] = when
                return
            self._db.execute("UPDATE models SET last_used = ? WHERE air = ?", (when, air))

    def set_pinned(self, air: str, pinned: bool) -> bool:
        if self.read_only:
            raise _read_only.refused("pinning", air)
        with self._lock:
            cursor = self._db.execute("UPDATE models SET pinned = ? WHERE air = ?", (int(pinned), air))
            return cursor.rowcount > 0

    def claim(self, air: str) -> None:
        """`air` is the operator's now (pulled or pinned): no request's download may evict it."""
        if self.read_only:
            return  # whoever filled the volume pulled it: it is the operator's already
        with self._lock:
            if self._db.execute("SELECT 1 FROM on_demand WHERE air = ?", (air,)).fetchone() is not None:
                self._db.execute("DELETE FROM on_demand WHERE air = ?", (air,))

    def remove(self, air: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM models WHERE air = ?", (air,))
            db.execute("DELETE FROM on_demand WHERE air = ?", (air,))

    def fast_digest(self, sha256: str) -> tuple[int, str] | None:
        """(size, fast digest) recorded for blob `sha256`, if any."""
        with self._lock:
            if sha256 in self._fast:
                return self._fast[sha256]
            row = self._db.execute("SELECT size, fast FROM blob_digests WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def record_fast_digest(self, sha256: str, size: int, fast: str) -> None:
        with self._lock:
            if self.read_only:
                self._fast[sha256] = (size, fast)
                return
            self._db.execute("INSERT OR REPLACE INTO blob_digests VALUES (?, ?, ?)", (sha256, size, fast))

    def referenced_blobs(self) -> set[str]:
        with self._lock:
            return {sha for (sha,) in self._db.execute("SELECT DISTINCT sha256 FROM model_files")}


def _column_architecture(architecture: Architecture) -> str:
    return (architecture if architecture in _COLUMN_ARCHITECTURES else Architecture.UNKNOWN).value


def _stored_metadata(entry: IndexEntry) -> dict[str, Any]:
    metadata = {k: v for k, v in entry.metadata.items() if k != _ARCHITECTURE_KEY}
    if entry.architecture not in _COLUMN_ARCHITECTURES:
        metadata[_ARCHITECTURE_KEY] = entry.architecture.value
    return metadata


def _read_architecture(column: str, metadata: Mapping[str, Any]) -> Architecture:
    named = metadata.get(_ARCHITECTURE_KEY)
    known = {a.value for a in Architecture}
    return Architecture(named) if isinstance(named, str) and named in known else Architecture(column)


def _entry(row: tuple[Any, ...], files: list[tuple[str, str, int]], on_demand: bool = False) -> IndexEntry:
    air, source, layout, architecture, path, sha256, size, metadata, added, last_used, pinned = row
    described = json.loads(metadata)
    return IndexEntry(
        air=air,
        source=source,
        layout=Layout(layout),
        architecture=_read_architecture(architecture, described),
        path=path,
        sha256=sha256,
        size_bytes=size,
        metadata=described,
        added=added,
        last_used=last_used,
        pinned=bool(pinned),
        files={p: (sha, n) for p, sha, n in files},
        on_demand=on_demand,
    )
