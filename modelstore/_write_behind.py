"""The write-behind writer: a response's chunks go to the partial file, and are hashed, on threads of their own
while the caller's thread goes on receiving."""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import BinaryIO

from modelstore._hasher import Hasher
from modelstore.errors import IntegrityError

log = logging.getLogger(__name__)


class WriteBehind:
    """Writes a response's chunks to the partial file, and hashes the file as it grows, on threads of their own.

    Receiving (the caller's thread), writing and hashing each spend most of their time outside the GIL, so
    apart they overlap, and a download runs near the speed of the slowest of the three instead of their sum;
    SHA256 alone costs about as much CPU as receiving and writing together (~0.8 s per GiB with SHA-NI).
    The writer writes every chunk the moment it arrives: on a stalled link everything delivered is already in
    the file (and survives a kill -9). The hasher reads back what the writer wrote, from the page cache, in
    `_HASH_BLOCK` pieces: it hashes exactly the bytes that will become the blob, and it takes the GIL once per
    4 MB instead of twice per received chunk (64 KB to 1 MB, as the socket delivers them); those hand-overs,
    fought over with the receiving thread, cost more than the hashing itself on a 2-core machine
    (benchmarks/bench_download.py measures all this).

    Every `_FLUSH_BYTES` written, a flusher thread asks the disk to write them out (fdatasync): the fsync
    that must precede the blob's rename (`BlobStore.adopt`) then finds a few MB left to write instead of the
    whole model, which otherwise made up a quarter of a 1 GiB download's time, spent after the last byte.
    Durability still comes from that fsync; these flushes only spread the same disk writes over the transfer.

    More bytes than the source published raise IntegrityError in `put`, before they are written. Leaving the
    block, normally or not, waits until every chunk received is written and hashed, so the partial file's
    size is exact for the next `Range`; an error in the writer (a full disk) is raised by the next `put` or
    there."""

    _HASH_BLOCK = 4 << 20
    _LIMIT = 32 << 20  # the receiver waits while this much is not yet written and hashed: bounded memory
    _FLUSH_BYTES = 32 << 20
    _POLL_S = 0.05  # a missed wake-up costs at most this much

    def __init__(self, out: BinaryIO, hasher: Hasher) -> None:
        self._fd = out.fileno()
        self._hasher = hasher
        self._room_left = hasher.room()  # None: no exact size known
        # The file holds `hasher.count` bytes, all hashed; new ones are appended after them.
        self._base = out.seek(hasher.count)
        # SimpleQueue: C-level put/get, cheap enough for one hand-over per received chunk; None ends the writer.
        self._to_write: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        # Each counter has one writing thread; the others only read it (atomic under the GIL).
        self._received = 0
        self._written = 0
        self._hashed = 0
        self._writer_done = False
        self._room = threading.Event()
        self._waiting = False
        self._hash_due = threading.Event()
        self._flush_due = threading.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._write, name="modelstore-writer", daemon=True),
            threading.Thread(target=self._hash, name="modelstore-hasher", daemon=True),
            threading.Thread(target=self._flush, name="modelstore-flusher", daemon=True),
        ]

    def __enter__(self) -> WriteBehind:
        for thread in self._threads:
            thread.start()
        return self

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        size = len(chunk)
        if self._room_left is not None:
            if size > self._room_left:
                raise self._hasher.too_long()
            self._room_left -= size
        self._received += size
        self._to_write.put(chunk)
        if self._received - self._hashed > self._LIMIT:  # hashed <= written <= received
            self._wait_for_room()

    def _behind(self) -> bool:
        """Whether the receiver must still wait (until half the limit is done, so it wakes up rarely)."""
        return self._received - self._hashed > self._LIMIT // 2

    def _wait_for_room(self) -> None:
        self._room.clear()
        self._waiting = True
        try:
            while self._error is None and self._behind():
                self._room.wait(self._POLL_S)
                self._room.clear()
        finally:
            self._waiting = False

    def _write(self) -> None:
        unflushed = 0
        try:
            while (chunk := self._to_write.get()) is not None:
                if self._error is None:
                    try:
                        _write_all(self._fd, chunk)
                    except BaseException as exc:  # a full disk: the receiver raises it
                        self._error = exc
                        self._hash_due.set()
                        continue
                    self._written += len(chunk)
                    unflushed += len(chunk)
                    if self._written - self._hashed >= self._HASH_BLOCK:
                        self._hash_due.set()
                    if unflushed >= self._FLUSH_BYTES:
                        unflushed = 0
                        self._flush_due.set()
        finally:
            self._writer_done = True
            self._hash_due.set()

    def _hash(self) -> None:
        block = memoryview(bytearray(self._HASH_BLOCK))
        while True:
            finished = self._writer_done  # read before `written`: no byte written after it is missed
            ready = self._written - self._hashed
            if self._error is not None or (finished and not ready):
                return
            if ready < self._HASH_BLOCK and not finished:
                self._hash_due.wait(self._POLL_S)
                self._hash_due.clear()
                continue
            try:
                read = os.preadv(self._fd, [block[: min(ready, self._HASH_BLOCK)]], self._base + self._hashed)
                if not read:
                    raise IntegrityError(f"{self._hasher.label}: the partial file shrank while downloading")
                self._hasher.update(block[:read])
            except BaseException as exc:
                self._error = exc
                return
            self._hashed += read
            if self._waiting and not self._behind():
                self._room.set()

    def _flush(self) -> None:
        while True:
            self._flush_due.wait()
            self._flush_due.clear()
            if self._closing:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:  # only an optimisation: adopt's fsync reports real trouble
                log.debug("fdatasync of a partial file failed: %s", exc)

    def __exit__(self, *exc_info: object) -> None:
        self._to_write.put(None)
        for thread in self._threads[:2]:
            thread.join()
        self._closing = True
        self._flush_due.set()
        self._threads[2].join()
        if self._error is not None:
            raise self._error


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written != len(data):  # a file may take less than offered (a signal, a nearly full disk)
        view = memoryview(data)
        while written < len(data):
            more = os.write(fd, view[written:])
            if not more:
                raise OSError("the partial file takes no more bytes")
            written += more
