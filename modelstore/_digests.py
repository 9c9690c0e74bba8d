"""Whole-file digests of blobs: the SHA256 that names a blob, and the fast digest kept beside it.

A blob's SHA256 is verified as it enters the cache (`_file_download`, `BlobStore.adopt`). Checking it again
before every process's first load would cost a full SHA256 of each model at every start: 4-6 s of CPU for a
6.9 GB SDXL checkpoint on the development machine (1.2-1.7 GB/s with SHA-NI; benchmarks/bench_blob_check.py).
So a fast digest of the same bytes, XXH3-128 (16 GB/s there, ten times less CPU), is computed from the
verified bytes in the same pass, recorded in the index, and compared before first use instead; the full
SHA256 stays for `refinery models verify`. XXH3 is not a cryptographic hash, and need not be: it detects
accidents (a flipped bit, a truncated or overwritten file) as surely as SHA256 does, and anyone able to
forge a matching file could as well rewrite the index that records the digest. The SHA256 check, against
the name the source published, is the one that proves a file is what it claims.

Reading overlaps hashing: one thread hashes a buffer while the next is read, so a cold read costs about the
slower of the disk and the hash, not their sum.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import xxhash

if TYPE_CHECKING:
    from modelstore.progress import ByteCounter

FAST_DIGEST = "xxh3-128"
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


def full_digests(path: Path, counter: ByteCounter | None = None) -> tuple[str, str]:
    """(SHA256, fast digest) of the file at `path`, in one read."""
    sha256, fast = _digest_file(path, [hashlib.sha256(), fast_hash()], counter)
    return sha256, fast


def _digest_file(path: Path, hashes: Sequence[_Hash], counter: ByteCounter | None) -> list[str]:
    buffers = (bytearray(_READ), bytearray(_READ))
    pending: Future[None] | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="modelstore-digest") as pool, path.open("rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        turn = 0
        while True:
            buffer = buffers[turn % 2]  # the other one may still be hashed meanwhile
            read = f.readinto(buffer)
            if pending is not None:
                pending.result()
            if not read:
                break
            pending = pool.submit(_update, hashes, memoryview(buffer)[:read])
            if counter is not None:
                counter.advance(read)
            turn += 1
    return [h.hexdigest() for h in hashes]


def _update(hashes: Sequence[_Hash], data: memoryview) -> None:
    for h in hashes:
        h.update(data)
