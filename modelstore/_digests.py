"""Whole-file digests (the one read loop that hashes files): the SHA256 that names a blob or a local model's file,
and the fast digest kept beside a blob.

A blob's SHA256 is verified as it enters the cache (`_file_download`, `BlobStore.adopt`). Checking it again
before every process's first load would cost a full SHA256 of each model at every start: for a 6.9 GB SDXL
checkpoint on the development machine (2 cores, SHA-NI), 3.7 s of CPU and 3.7-5.0 s from the page cache,
6.2-6.9 s from the disk (benchmarks/bench_blob_check.py). So a fast digest of the same bytes, XXH3-128, is
computed from the verified bytes in the same pass, recorded in the index, and compared before first use
instead: 0.4 s of CPU and 0.6 s from the page cache for the same file (12 GB/s), bound by the disk when the
file is not cached (3.1-3.9 s), and the read warms the page cache for the load that follows. The full SHA256
stays for `refinery models verify`. XXH3 is not a cryptographic hash, and need not be here: it catches
accidents (a flipped bit, a truncated or overwritten file) as reliably as SHA256 for any practical purpose,
and whoever could forge a matching file could as well rewrite the index that records the digest. The SHA256
check, against the name the source published, is the one that proves a file is what it claims.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import xxhash

if TYPE_CHECKING:
    from modelstore.progress import ByteCounter

_READ = 8 << 20


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def fast_hash() -> xxhash.xxh3_128:
    """A new running fast digest (for bytes hashed as they stream in)."""
    return xxhash.xxh3_128()


def fast_digest(path: Path, counter: ByteCounter | None = None) -> str:
    """The fast digest of the file at `path`; `counter` hears the bytes as they are read."""
    (digest,) = _digest_file(path, [fast_hash()], counter)
    return digest


def sha256_digest(path: Path, counter: ByteCounter | None = None) -> str:
    """The SHA256 of the file at `path` (a local model's file); `counter` hears the bytes as they are read."""
    (digest,) = _digest_file(path, [hashlib.sha256()], counter)
    return digest


def full_digests(path: Path, counter: ByteCounter | None = None) -> tuple[str, str]:
    """(SHA256, fast digest) of the file at `path`, in one read."""
    sha256, fast = _digest_file(path, [hashlib.sha256(), fast_hash()], counter)
    return sha256, fast


def _digest_file(path: Path, hashes: Sequence[_Hash], counter: ByteCounter | None) -> list[str]:
    buffer = bytearray(_READ)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while read := f.readinto(buffer):
            for h in hashes:
                h.update(view[:read])
            if counter is not None:
                counter.advance(read)
    return [h.hexdigest() for h in hashes]
