"""Resumable, verified transfer of one remote file into the blob store.

The bytes stream into `partial/<expected sha256>.part` while being hashed (`_write_behind`). When the file is
complete its size and SHA256 are compared with what the source published (`_hasher`), a weight file's
safetensors header is checked (a pickle is refused, never deserialised), and only then does the file move into
the blob store, with an fsync and an atomic rename (`BlobStore.adopt`). So a wrong hash, a short body or an
error page never enters the cache.

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

import enum
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import requests

from modelstore._blobs import BlobStore
from modelstore._hasher import Hasher
from modelstore._http import TRANSPORT_ERRORS, BrokenTransfer, describe, get, origin, receive, response_error
from modelstore._redact import url_for_log
from modelstore._remote import Location, RemoteFile
from modelstore._write_behind import WriteBehind
from modelstore.errors import IntegrityError, SourceUnavailable

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
# The most one read takes from the socket: what is there is taken at once, up to this much (loopback and fast
# links deliver hundreds of KB per read; fewer, larger chunks mean fewer hand-overs to the writer thread).
_RECEIVE_CHUNK = 1 << 20


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

    def advance(self, nbytes: int, *, received: bool = False) -> None:
        """`nbytes` more bytes are in the partial file (negative when bytes must be fetched again); `received`:
        they just arrived over the network (rather than being found on disk, or taken back)."""

    def exact_size(self, nbytes: int) -> None:
        """The server stated the file's exact size."""


class _Outcome(enum.Enum):
    """How one request for a file's bytes ended, when it raised nothing."""

    COMPLETE = "complete"  # every byte is in the partial file
    EXPIRED = "expired"  # storage refused the link: ask the source for a fresh one
    SERVER_ERROR = "server error"  # a 5xx: try again after a pause


class Downloader:
    def __init__(
        self,
        blobs: BlobStore,
        session: requests.Session,
        *,
        retry: RetryPolicy | None = None,
        secrets: tuple[str | None, ...] = (),
    ) -> None:
        self._blobs = blobs
        self._session = session
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
            return self._fetch_locked(file, progress)

    def _fetch_locked(self, file: RemoteFile, progress: ProgressSink) -> str:
        partial = self._blobs.partial_path(file.key)
        started_over = False
        while True:
            resumed = self._blobs.partial_size(file.key) > 0
            counted = _Counted(progress)
            try:
                sha256, fast = self._transfer(file, partial, counted)
                label = file.label if file.safetensors else None
                self._blobs.adopt(partial, sha256, fast_digest=fast, check_safetensors_as=label)
                return sha256
            except IntegrityError as exc:
                partial.unlink(missing_ok=True)
                counted.rewind()
                if not resumed or started_over:
                    raise
                started_over = True
                log.warning("%s: %s; downloading it again from the start", file.label, describe(exc, self._secrets))
            except BaseException:
                if self._blobs.partial_size(file.key) == 0:
                    partial.unlink(missing_ok=True)  # nothing to resume: leave no trace
                raise

    def _transfer(self, file: RemoteFile, partial: Path, progress: ProgressSink) -> tuple[str, str]:
        """Bring `partial` to the complete file; return its verified sha256 and its fast digest."""
        with _open_partial(partial) as out:
            hasher = Hasher(file)
            offset = hasher.absorb(out)
            if offset:
                log.info("%s: resuming at byte %d", file.label, offset)
                progress.advance(offset)
            self._stream(file, _Partial(out, hasher, progress))
        # Durability comes with BlobStore.adopt's fsync, for verified bytes only.
        return hasher.verify(), hasher.fast_digest

    def _stream(self, file: RemoteFile, partial: _Partial) -> None:
        """Request the missing bytes until the partial file is complete: resuming after drops, asking the source
        for a fresh link when storage says the old one expired, pausing after server errors."""
        location: Location | None = None
        fresh_urls = failures = 0
        while True:
            if location is None:
                location = file.locate()
                fresh_urls += 1
            before = partial.hasher.count
            try:
                outcome = self._attempt(
                    file,
                    location,
                    partial,
                    relocate=fresh_urls <= self._retry.relocations,
                    retry=failures < self._retry.attempts,
                )
            except TRANSPORT_ERRORS as exc:
                kept = partial.hasher.count
                failures = 1 if kept > before else failures + 1  # patience resets while bytes arrive
                if failures > self._retry.attempts:
                    raise SourceUnavailable(
                        f"downloading {file.label} from {file.source} failed ({describe(exc, self._secrets)}); "
                        f"{kept} bytes are kept and the next attempt resumes from there"
                    ) from None
                log.warning("%s: cut at byte %d (%s); resuming", file.label, kept, describe(exc, self._secrets))
                time.sleep(self._retry.delay(failures))
                continue
            if outcome is _Outcome.COMPLETE:
                return
            if outcome is _Outcome.EXPIRED:
                location = None
            else:
                failures += 1
                time.sleep(self._retry.delay(failures))

    def _attempt(
        self, file: RemoteFile, location: Location, partial: _Partial, *, relocate: bool, retry: bool
    ) -> _Outcome:
        """One request for the bytes the partial file lacks. Raises TRANSPORT_ERRORS for a failed connection
        (including a body that ended early), store errors for an answer that retrying cannot change."""
        headers = dict(location.headers)
        if partial.hasher.count:
            headers["Range"] = f"bytes={partial.hasher.count}-"
        with get(self._session, location.url, headers, follow_redirects=True) as response:
            status = response.status_code
            if status == 416:
                if partial.hasher.accept_unsatisfiable(_unsatisfied_total(response)):
                    return _Outcome.COMPLETE  # the partial file already holds every byte
                raise IntegrityError(
                    f"{file.label}: {file.source} has fewer bytes than the {partial.hasher.count} received"
                )
            if status in (400, 401, 403) and relocate and _refusal_is_expiry(location, response):
                log.info(
                    "%s: storage refused the download link (HTTP %d); asking %s for a fresh one",
                    file.label,
                    status,
                    file.source,
                )
                return _Outcome.EXPIRED
            if status >= 500 and retry:
                log.warning("%s: HTTP %d from %s; retrying", file.label, status, url_for_log(response.url))
                return _Outcome.SERVER_ERROR
            if status not in (200, 206):
                raise response_error(
                    response, what=file.label, source=file.source, token_hint=file.token_hint, secrets=self._secrets
                )
            total = partial.position(file, response)
            partial.receive(response)
        if partial.hasher.complete(clean_end_without_size=total is None):
            return _Outcome.COMPLETE
        # A body that ended cleanly but short is a dropped connection too: resume.
        raise BrokenTransfer("the body ended before the file was complete")


@dataclass(frozen=True)
class _Partial:
    """The partial file one transfer appends to: the open file, its hashes, and who hears of its growth."""

    out: BinaryIO
    hasher: Hasher
    progress: ProgressSink

    def position(self, file: RemoteFile, response: requests.Response) -> int | None:
        """Check where a 200/206 body starts and how long the file is (starting the file again if the server
        ignored our range); the total size the server states, if any."""
        start, total = _span(response)
        if start != self.hasher.count:
            if response.status_code == 206:
                raise BrokenTransfer("206 for a range we did not ask for")
            log.info("%s: the server ignored the range request; starting again", file.label)
            self.progress.advance(-self.hasher.restart(self.out))
        if total is not None and self.hasher.check_total(total):
            self.progress.exact_size(total)
        return total

    def receive(self, response: requests.Response) -> None:
        """Append the body to the file as it arrives (no re-chunking: what arrived before a drop is kept)."""
        with WriteBehind(self.out, self.hasher) as writer, _Batched(self.progress) as received:
            for chunk in receive(response, _RECEIVE_CHUNK):
                writer.put(chunk)
                received.advance(len(chunk))


class _Batched:
    """Passes byte counts on in batches: a chunk arrives every few microseconds on a fast link, and the
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
            self._sink.advance(pending, received=True)

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

    def advance(self, nbytes: int, *, received: bool = False) -> None:
        self.net += nbytes
        self._sink.advance(nbytes, received=received)

    def exact_size(self, nbytes: int) -> None:
        self._sink.exact_size(nbytes)

    def rewind(self) -> None:
        if self.net:
            self._sink.advance(-self.net)
            self.net = 0


def _open_partial(path: Path) -> BinaryIO:
    # Not "ab": appending mode ignores seek, and a restart must truncate and rewrite from zero. Unbuffered:
    # the chunks are large already, and what was written is in the OS at once (a kill -9 loses nothing).
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    return os.fdopen(fd, "r+b", buffering=0)


def _span(response: requests.Response) -> tuple[int, int | None]:
    """(first byte, total size) of what a 200 or 206 response carries."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None:
            raise BrokenTransfer("206 without a usable Content-Range")
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def _unsatisfied_total(response: requests.Response) -> int | None:
    match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _refusal_is_expiry(location: Location, response: requests.Response) -> bool:
    """Whether a 400/401/403 came from presigned storage (ask for a fresh URL) rather than from the source."""
    if location.expiring:
        return True
    # We asked the source and it redirected us to storage, which refused: the redirect target expired.
    return origin(response.url) != origin(location.url)
