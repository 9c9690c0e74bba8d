"""Resumable, verified transfer of one remote file into the blob store.

The bytes stream into `partial/<expected sha256>.part` while being hashed. When the file is complete its
size and SHA256 are compared with what the source published, a weight file's safetensors header is checked
(a pickle is refused, never deserialised), and only then does the file move into the blob store, with an fsync
and an atomic rename (`BlobStore.adopt`). So a wrong hash, a short body or an error page never enters the
cache.

Resuming: the partial file is keyed by the content it will become, never by a process or a URL, so an
interrupted transfer continues with `Range: bytes=<partial size>-` in the same call (a dropped connection), in
a later call, or after a restart (`kill -9` included). A presigned storage URL that stopped working (400, 401
or 403 from storage: expired) is replaced by asking the source for a fresh one (`RemoteFile.locate`), and the
transfer continues from where it was. A server that ignores `Range` (200) restarts the file from zero; a
resumed file that fails verification is downloaded once more from zero before giving up, because the bytes
kept from an earlier attempt may be what was wrong.

One writer per partial file, across threads and processes: a file lock per key. A second process that wants
the same file waits for the lock and then finds the blob in place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import httpx

from modelstore._blobs import BlobStore
from modelstore._http import error_for_status, retry_after_s, server_message
from modelstore._redact import redact, redact_url
from modelstore.errors import IntegrityError, ModelStoreError, SourceUnavailable

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
# civitai states sizes in KB with two decimals; allow rounding, and a little slack for how it was computed.
_APPROX_SLACK_BYTES = 4096
_APPROX_SLACK_RATIO = 0.005


@dataclass(frozen=True)
class Location:
    """Where to GET a file's bytes right now, and with which headers (a token only for its own host)."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    # True for presigned storage URLs: a 400/401/403 from them means "expired", so ask the source again.
    expiring: bool = False


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model at its source: what it must be, and how to find a URL for it."""

    path: str  # where it goes in the model's folder: chosen by us, never by the server
    label: str  # what to call it in messages and progress (may be the server's file name: metadata only)
    locate: Callable[[], Location] = field(compare=False, repr=False)
    approx_size: int  # for quota decisions before the first byte
    size: int | None = None  # exact size, when the source publishes one
    sha256: str | None = None  # lower-case hex; civitai's hashes.SHA256, Hugging Face's LFS oid
    git_sha1: str | None = None  # Hugging Face's oid for small non-LFS files (git blob sha1)
    safetensors: bool = True  # a weight file: its header is checked before it enters the cache
    source: str = "the source"  # for messages
    token_hint: str = "a token"  # the setting that carries credentials, for messages

    @property
    def key(self) -> str:
        """The partial file's name: the expected content, so every attempt anywhere finds the same file."""
        if self.sha256 is not None:
            return self.sha256
        if self.git_sha1 is not None:
            return f"git-{self.git_sha1}"
        raise IntegrityError(f"{self.label}: {self.source} publishes no hash, so it cannot be verified")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a transfer that makes no progress (each byte received resets the count)."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    relocations: int = 3  # fresh URLs in a row that storage may refuse before we believe it

    def delay(self, failures: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)))


class ProgressSink(Protocol):
    """Receives one file's byte counts as they arrive."""

    def advance(self, nbytes: int) -> None:
        """`nbytes` more bytes are in the partial file (negative when bytes must be fetched again)."""

    def exact_size(self, nbytes: int) -> None:
        """The server stated the file's exact size."""


class Downloader:
    def __init__(
        self,
        blobs: BlobStore,
        client: httpx.Client,
        *,
        retry: RetryPolicy | None = None,
        secrets: tuple[str | None, ...] = (),
    ) -> None:
        self._blobs = blobs
        self._client = client
        self._retry = retry or RetryPolicy()
        self._secrets = secrets

    def fetch(self, file: RemoteFile, progress: ProgressSink) -> str:
        """Bring `file` into the blob store (unless it is already there) and return its sha256."""
        key = file.key
        if file.sha256 is not None and self._blobs.has(file.sha256):
            return file.sha256
        # Another process may be downloading this very file: its partial file's growth is our progress.
        watched = _Watched(self._blobs, key, progress)
        with self._blobs.lock(key, while_waiting=watched.poll):
            watched.rewind()
            if file.sha256 is not None and self._blobs.has(file.sha256):
                log.info("%s: downloaded by another process meanwhile", file.label)
                size = self._blobs.size(file.sha256)
                progress.exact_size(size)
                progress.advance(size)
                return file.sha256
            partial = self._blobs.partial_path(key)
            started_over = False
            while True:
                resumed = self._blobs.partial_size(key) > 0
                counted = _Counted(progress)
                try:
                    sha256 = self._transfer(file, partial, counted)
                    label = file.label if file.safetensors else None
                    self._blobs.adopt(partial, sha256, check_safetensors_as=label)
                    return sha256
                except IntegrityError as exc:
                    partial.unlink(missing_ok=True)
                    counted.rewind()
                    if not resumed or started_over:
                        raise
                    started_over = True
                    log.warning("%s: %s; downloading it again from the start", file.label, _reason(exc))
                except BaseException:
                    if self._blobs.partial_size(key) == 0:
                        partial.unlink(missing_ok=True)  # nothing to resume: leave no trace
                    raise

    def _transfer(self, file: RemoteFile, partial: Path, progress: ProgressSink) -> str:
        """Bring `partial` to the complete file; return its verified sha256."""
        with _open_partial(partial) as out:
            hasher = _Hasher(file)
            offset = hasher.absorb(out)
            if offset:
                log.info("%s: resuming at byte %d", file.label, offset)
                progress.advance(offset)
            self._stream(file, out, hasher, progress)
        return hasher.verify()  # durability comes with BlobStore.adopt's fsync, for verified bytes only

    def _stream(self, file: RemoteFile, out: BinaryIO, hasher: _Hasher, progress: ProgressSink) -> None:
        location: Location | None = None
        fresh_urls = 0
        failures = 0
        while True:
            if location is None:
                location = file.locate()
                fresh_urls += 1
            before = hasher.count
            headers = dict(location.headers)
            if hasher.count:
                headers["Range"] = f"bytes={hasher.count}-"
            try:
                request = self._client.stream("GET", location.url, headers=headers, follow_redirects=True)
                with request as response:
                    status = response.status_code
                    if status == 416:
                        if hasher.accept_unsatisfiable(_unsatisfied_total(response)):
                            return  # the partial file already holds every byte
                        raise IntegrityError(
                            f"{file.label}: {file.source} has fewer bytes than the {hasher.count} received"
                        )
                    if (
                        status in (400, 401, 403)
                        and _refusal_is_expiry(location, response)
                        and fresh_urls <= self._retry.relocations
                    ):
                        log.info(
                            "%s: storage refused the download link (HTTP %d); asking %s for a fresh one",
                            file.label,
                            status,
                            file.source,
                        )
                        location = None
                        continue
                    if status >= 500 and failures < self._retry.attempts:
                        failures += 1
                        log.warning("%s: HTTP %d from %s; retrying", file.label, status, _where(response))
                        time.sleep(self._retry.delay(failures))
                        continue
                    if status not in (200, 206):
                        raise self._status_error(file, response)
                    start, total = _span(response)
                    if start != hasher.count:
                        if status == 206:
                            raise httpx.RemoteProtocolError("206 for a range we did not ask for")
                        log.info("%s: the server ignored the range request; starting again", file.label)
                        progress.advance(-hasher.restart(out))
                    if total is not None and hasher.check_total(total):
                        progress.exact_size(total)
                    with _WriteBehind(out, hasher) as writer, _Batched(progress) as received:
                        # As received (no re-chunking): what arrived before a drop is written and kept.
                        for chunk in response.iter_bytes():
                            writer.put(chunk)
                            received.advance(len(chunk))
                if hasher.complete(clean_end_without_size=total is None):
                    return
                # A body that ended cleanly but short is a dropped connection too: resume.
                raise httpx.RemoteProtocolError("the body ended before the file was complete")
            except httpx.TransportError as exc:
                failures = 1 if hasher.count > before else failures + 1  # patience resets while bytes arrive
                if failures > self._retry.attempts:
                    raise SourceUnavailable(
                        f"downloading {file.label} from {file.source} failed ({_reason(exc)}); "
                        f"{hasher.count} bytes are kept and the next attempt resumes from there"
                    ) from None
                log.warning("%s: cut at byte %d (%s); resuming", file.label, hasher.count, _reason(exc))
                time.sleep(self._retry.delay(failures))

    def _status_error(self, file: RemoteFile, response: httpx.Response) -> ModelStoreError:
        return error_for_status(
            response.status_code,
            what=file.label,
            message=server_message(response),
            source=file.source,
            token_hint=file.token_hint,
            retry_after=retry_after_s(response),
            secrets=self._secrets,
        )


class _WriteBehind:
    """Writes a response's chunks to the partial file, and hashes the file as it grows, on threads of their own.

    Receiving (the caller's thread), writing and hashing each spend most of their time outside the GIL, so
    apart they overlap, and a download runs near the speed of the slowest of the three instead of their sum;
    SHA256 alone costs about as much CPU as receiving and writing together (~0.8 s per GiB with SHA-NI).
    The writer writes every chunk the moment it arrives: on a stalled link everything delivered is already in
    the file (and survives a kill -9). The hasher reads back what the writer wrote, from the page cache, in
    `_HASH_BLOCK` pieces: it hashes exactly the bytes that will become the blob, and it takes the GIL once per
    4 MB instead of twice per 64 KB chunk; those hand-overs, fought over with the receiving thread, cost more
    than the hashing itself on a 2-core machine (benchmarks/bench_download.py measures all this).

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

    def __init__(self, out: BinaryIO, hasher: _Hasher) -> None:
        self._fd = out.fileno()
        self._hasher = hasher
        self._room_left = hasher.room()  # None: no exact size known
        # The file holds `hasher.count` bytes, all hashed; new ones are appended after them.
        self._base = out.seek(hasher.count)
        # SimpleQueue: C-level put/get, cheap enough for one hand-over per 64 KB chunk; None ends the writer.
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

    def __enter__(self) -> _WriteBehind:
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


class _Batched:
    """Passes byte counts on in batches: a 64 KB chunk arrives every few microseconds on a fast link, and the
    progress fan-out (locks, a clock, a rate window) per chunk is CPU taken from receiving and hashing.
    Leaving the block passes on the rest, so the count is exact before a discarded attempt rewinds it."""

    _BYTES = 1 << 20
    _INTERVAL_S = 0.05  # well under the fan-out's own 0.1 s, so a slow link's progress is not delayed

    def __init__(self, sink: ProgressSink) -> None:
        self._sink = sink
        self._pending = 0
        self._last = time.monotonic()

    def __enter__(self) -> _Batched:
        return self

    def advance(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending >= self._BYTES or time.monotonic() - self._last >= self._INTERVAL_S:
            self._pass_on()

    def _pass_on(self) -> None:
        self._last = time.monotonic()
        if self._pending:
            pending, self._pending = self._pending, 0
            self._sink.advance(pending)

    def __exit__(self, *exc_info: object) -> None:
        self._pass_on()


class _Watched:
    """Reports another process's progress on a partial file while we wait for its lock."""

    def __init__(self, blobs: BlobStore, key: str, progress: ProgressSink) -> None:
        self._blobs = blobs
        self._key = key
        self._counted = _Counted(progress)

    def poll(self) -> None:
        size = self._blobs.partial_size(self._key)
        if size > self._counted.net:
            self._counted.advance(size - self._counted.net)

    def rewind(self) -> None:
        """Take back what was reported: from here on this process reports its own bytes."""
        self._counted.rewind()


class _Counted:
    """A progress sink that remembers how much it reported, so a discarded attempt can take it back."""

    def __init__(self, sink: ProgressSink) -> None:
        self._sink = sink
        self.net = 0

    def advance(self, nbytes: int) -> None:
        self.net += nbytes
        self._sink.advance(nbytes)

    def exact_size(self, nbytes: int) -> None:
        self._sink.exact_size(nbytes)

    def rewind(self) -> None:
        if self.net:
            self._sink.advance(-self.net)
            self.net = 0


class _Hasher:
    """The running hashes and byte count of one partial file, and the checks against what was published."""

    def __init__(self, file: RemoteFile) -> None:
        self._file = file
        self._expected_size = file.size
        self._reset()

    def _reset(self) -> None:
        self._sha256 = hashlib.sha256()
        self._sha1: Any = None
        if self._file.git_sha1 is not None and self._file.size is not None:
            # git names a blob by sha1("blob <size>\0" + content).
            self._sha1 = hashlib.sha1(f"blob {self._file.size}\0".encode(), usedforsecurity=False)
        self.count = 0

    def absorb(self, out: BinaryIO) -> int:
        """Hash the bytes an earlier attempt left in the partial file; return how many there are."""
        existing = os.fstat(out.fileno()).st_size
        if self._expected_size is not None and existing > self._expected_size:
            return self.restart(out)
        out.seek(0)
        while chunk := out.read(4 << 20):
            self.update(chunk)
        return self.count

    def restart(self, out: BinaryIO) -> int:
        """Empty the partial file; return how many bytes were dropped."""
        dropped = self.count
        out.seek(0)
        out.truncate()
        self._reset()
        return dropped

    @property
    def label(self) -> str:
        return self._file.label

    def update(self, chunk: bytes | memoryview) -> None:
        self._sha256.update(chunk)
        if self._sha1 is not None:
            self._sha1.update(chunk)
        self.count += len(chunk)

    def room(self) -> int | None:
        """How many more bytes the file may have, when its exact size is known."""
        return None if self._expected_size is None else self._expected_size - self.count

    def too_long(self) -> IntegrityError:
        return IntegrityError(f"{self._file.label}: {self._file.source} sent more than {self._expected_size} bytes")

    def _plausible(self, total: int) -> bool:
        if self._file.size is not None:
            return total == self._file.size
        slack = _APPROX_SLACK_BYTES + int(self._file.approx_size * _APPROX_SLACK_RATIO)
        return abs(total - self._file.approx_size) <= slack

    def check_total(self, total: int) -> bool:
        """Refuse, before reading the body, a file whose size is not the published one (an error page, another
        object, a changed upload). True when this is the first exact size learned."""
        if not self._plausible(total):
            published = self._file.size if self._file.size is not None else f"about {self._file.approx_size}"
            raise IntegrityError(
                f"{self._file.label}: {self._file.source} serves {total} bytes, but published {published}"
            )
        first = self._expected_size is None
        self._expected_size = total
        return first

    def accept_unsatisfiable(self, total: int | None) -> bool:
        """A 416 to our range: fine only if we already hold exactly the whole file."""
        if total is None or total != self.count:
            return False
        self.check_total(total)
        return True

    def complete(self, *, clean_end_without_size: bool) -> bool:
        if self._expected_size is not None:
            return self.count == self._expected_size
        # No size from the server and only an approximate one published: a clean end of a plausible size.
        return clean_end_without_size and self._plausible(self.count)

    def verify(self) -> str:
        """The sha256 of the complete file, after checking it against everything the source published."""
        file = self._file
        if self._expected_size is not None and self.count != self._expected_size:
            raise IntegrityError(f"{file.label}: received {self.count} of {self._expected_size} bytes")
        actual = self._sha256.hexdigest()
        if file.sha256 is not None and actual != file.sha256:
            raise IntegrityError(
                f"{file.label}: SHA256 mismatch (expected {file.sha256}, received {actual}); the download was discarded"
            )
        if self._sha1 is not None and self._sha1.hexdigest() != file.git_sha1:
            raise IntegrityError(f"{file.label}: content does not match {file.source}'s git hash; discarded")
        return actual


def _open_partial(path: Path) -> BinaryIO:
    # Not "ab": appending mode ignores seek, and a restart must truncate and rewrite from zero. Unbuffered:
    # the chunks are large already, and what was written is in the OS at once (a kill -9 loses nothing).
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    return os.fdopen(fd, "r+b", buffering=0)


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written != len(data):  # a file may take less than offered (a signal, a nearly full disk)
        view = memoryview(data)
        while written < len(data):
            more = os.write(fd, view[written:])
            if not more:
                raise OSError("the partial file takes no more bytes")
            written += more


def _span(response: httpx.Response) -> tuple[int, int | None]:
    """(first byte, total size) of what a 200 or 206 response carries."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None:
            raise httpx.RemoteProtocolError("206 without a usable Content-Range")
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def _unsatisfied_total(response: httpx.Response) -> int | None:
    match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _refusal_is_expiry(location: Location, response: httpx.Response) -> bool:
    """Whether a 400/401/403 came from presigned storage (ask for a fresh URL) rather than from the source."""
    if location.expiring:
        return True
    # We asked the source and it redirected us to storage, which refused: the redirect target expired.
    return _origin(str(response.url)) != _origin(location.url)


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port


def _where(response: httpx.Response) -> str:
    return redact_url(str(response.url))


def _reason(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return redact(text)
