"""The image store: input images (uploaded, or sent inline) and results kept on request, on the cache volume.

An image is a file named by its sha256 (`<directory>/<hex>`) with a record beside it (`records.py`: its
header's size and format, its file's size, its expiry). Nothing is held in memory but the records; bytes go
from the wire or the encoder to a temporary file, are checked from the file's header (`header.py`), and are
renamed into place whole (`files.py`).

- Time: every image expires (`default_keep_s` unless asked, never beyond `max_keep_s`); an expired image is not
  found, and is deleted by `sweep` (at start, before a write that would not fit, and once due: as a put passes
  the next expiry, and from the server's periodic `sweep_if_due`). Storing the same bytes again keeps them until
  the later of the two expiries.
- Use: `hold(images)` for the life of a request keeps them on disk past their expiry until it ends.
- Space: stored images plus uploads in flight stay within `quota_bytes`; a write that does not fit after the
  sweep is refused (ImageStoreFull) before any byte is written, with the time until the next expiry.

Errors are raised without a request field (`ImageError.at` adds one): ImageNotFound, BadImage, ImageStoreFull.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from server.core.errors import BadImage, ImageNotFound, ImageStoreFull
from server.core.seed_images import StoredImage
from server.core.settings import Settings
from server.images import files, records
from server.images.header import ImageLimits, read_header
from server.images.records import Record
from server.images.upload import DATA, KEEP_FOR, SIZE, TempWriter, Upload

log = logging.getLogger(__name__)

REFERENCE_PREFIX = "sha256:"
# A temporary file untouched this long is a leftover of a crash (an upload in flight writes every few ms).
STALE_TEMP_S = 3600.0


@dataclass(frozen=True)
class StoreLimits:
    """How much, and for how long, the store keeps."""

    image: ImageLimits
    default_keep_s: float
    max_keep_s: float
    quota_bytes: int


def digest_of(reference: str) -> str:
    """The hex digest a reference names. BadImage for text that is not "sha256:<64 hex digits>"."""
    digest = reference.removeprefix(REFERENCE_PREFIX).lower()
    if not reference.startswith(REFERENCE_PREFIX) or not files.is_digest(digest):
        raise BadImage('not an image reference: expected "sha256:" and 64 hex digits')
    return digest


class ImageStore:
    """Images by content hash under `directory`, created if missing; records are read at construction and
    expired images swept. Thread-safe: the RPCs call it on the event loop and from threads."""

    def __init__(self, directory: Path, limits: StoreLimits, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.limits = limits
        self._clock = clock  # wall-clock seconds: expiries outlive the process
        self._lock = threading.Lock()  # the in-memory state; held for microseconds, never across I/O
        self._writing = threading.Lock()  # disk changes (commit, extend, delete), always taken before `_lock`
        self._records: dict[str, Record] = {}
        self._held: dict[str, int] = {}
        self._used = 0
        self._reserved = 0
        self._next_expiry = float("inf")
        directory.mkdir(parents=True, exist_ok=True)
        self._load()

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> ImageStore:
        images = settings.images
        limits = StoreLimits(
            image=ImageLimits(images.max_bytes, settings.limits.max_side, images.max_pixels),
            default_keep_s=images.default_keep_s,
            max_keep_s=images.max_keep_s,
            quota_bytes=images.quota_bytes,
        )
        return cls(images.directory_in(settings.store.cache_dir), limits, clock=clock)

    # ---- reading -----------------------------------------------------------------------------------------

    def find(self, reference: str) -> StoredImage:
        """The image `reference` ("sha256:<hex>") names. ImageNotFound when it is not stored or has expired
        (whether or not a running request still holds it); BadImage when the text is not a reference."""
        digest = digest_of(reference)
        with self._lock:
            record = self._records.get(digest)
        if record is None or record.expires_at <= self._clock():
            raise ImageNotFound(reference)
        image = self._stored(record)
        if not image.path.exists():  # removed behind the store's back: as good as never stored
            raise ImageNotFound(reference)
        return image

    @property
    def used_bytes(self) -> int:
        """Bytes of the images stored now (expired ones not yet swept included)."""
        with self._lock:
            return self._used

    def keep_time(self, keep_for_s: float | None) -> float:
        """Seconds an image asked to be kept `keep_for_s` (None or 0: the default) is kept: at most the limit."""
        if keep_for_s is not None and keep_for_s < 0:
            raise BadImage(f"a negative time to keep ({keep_for_s:g} s)")
        return min(keep_for_s or self.limits.default_keep_s, self.limits.max_keep_s)

    # ---- writing -----------------------------------------------------------------------------------------

    def put_bytes(self, data: bytes, keep_for_s: float | None = None) -> StoredImage:
        """Store `data` (an inline image, a result to keep) and return it. BadImage when it is not an image this
        server takes, ImageStoreFull over the limit per image or the quota. Blocking: call it off the event loop."""
        keep_s = self.keep_time(keep_for_s)
        with self.reserved(len(data)):
            temp, file = files.open_temp(self.directory)
            try:
                with file:
                    file.write(data)
                    return self.commit(temp, file, hashlib.sha256(data).hexdigest(), len(data), keep_s)
            finally:
                files.remove(temp)

    async def upload(self, upload: Upload, chunks: AsyncIterator[bytes]) -> StoredImage:
        """Store the bytes `chunks` yields, which `upload` describes: each written to a temporary file as it
        arrives, the whole checked (count, sha256, image header) and renamed into place only once the stream
        has ended whole. Anything else (an error, a cancelled or broken stream) keeps nothing and leaves no
        file. Errors name the part of `upload` they concern, or "data" (`server.images.upload`)."""
        upload.check()
        try:
            keep_s = self.keep_time(upload.keep_for_s)
        except BadImage as exc:
            raise exc.at(KEEP_FOR) from None
        with contextlib.ExitStack() as stack:
            try:
                self._check_size(upload.size_bytes)
                if not self._reserve(upload.size_bytes):
                    await asyncio.to_thread(self.sweep)  # in a thread: it may wait for another write's fsync
                    if not self._reserve(upload.size_bytes):
                        raise self._full(upload.size_bytes)
            except ImageStoreFull as exc:
                raise exc.at(SIZE) from None
            stack.callback(self._release, upload.size_bytes)  # no await since the room was taken: never leaked
            writer = TempWriter(self.directory, upload)
            stack.callback(writer.close)  # however the stream ends: on success the file was renamed away
            async for chunk in chunks:
                await asyncio.to_thread(writer.write, chunk)
            digest, file = writer.finish()
            try:
                return await asyncio.to_thread(self.commit, writer.path, file, digest, upload.size_bytes, keep_s)
            except BadImage as exc:
                raise exc.at(DATA) from None
        raise AssertionError("unreachable")  # ExitStack does not swallow exceptions; mypy cannot know

    @contextlib.contextmanager
    def reserved(self, size: int) -> Iterator[None]:
        """Room for `size` bytes while a write of them is in flight. ImageStoreFull at once when there is none
        (over the limit per image, or over the quota after sweeping what expired)."""
        self._check_size(size)
        if not self._reserve(size):
            self.sweep()
            if not self._reserve(size):
                raise self._full(size)
        try:
            yield
        finally:
            self._release(size)

    def _check_size(self, size: int) -> None:
        limit = self.limits.image.max_bytes
        if size > limit:
            raise ImageStoreFull(f"the image is {size} bytes; this server stores at most {limit} bytes per image")

    def _release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def _reserve(self, size: int) -> bool:
        with self._lock:
            if self._used + self._reserved + size > self.limits.quota_bytes:
                return False
            self._reserved += size
            return True

    def _full(self, size: int) -> ImageStoreFull:
        quota = self.limits.quota_bytes
        with self._lock:
            free = max(0, quota - self._used - self._reserved)
            expiries = [r.expires_at for r in self._records.values()]
        retry = max(1.0, min(expiries) - self._clock()) if expiries and size <= quota else None
        return ImageStoreFull(
            f"the image store is full: {size} bytes do not fit in the {free} of its {quota}-byte quota left",
            retry_after_s=retry,
        )

    def commit(self, temp: Path, file: BinaryIO | None, digest: str, size: int, keep_s: float) -> StoredImage:
        """Check the written file `temp` (`size` bytes, sha256 `digest`) from its header and make it the stored
        image, or extend the stored copy's time. The caller holds a reservation and removes `temp` after."""
        if file is not None:
            file.flush()  # what the header check reads
        header = read_header(temp, self.limits.image)
        final = files.image_path(self.directory, digest)
        with self._writing:
            now = self._clock()
            with self._lock:
                existing = self._records.get(digest)
            if existing is not None and final.exists():
                if file is not None:
                    file.close()
                record = replace(existing, expires_at=max(existing.expires_at, now + keep_s))
            else:
                files.commit(temp, final, file)
                record = Record(digest, header.mime_type, header.width, header.height, size, now + keep_s)
            record.write(self.directory)
            self._remember(record)
        self.sweep_if_due()
        return self._stored(record)

    # ---- time --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, images: Iterable[StoredImage]) -> Iterator[None]:
        """Keep `images` on disk while the block runs (a request reading them), even past their expiry. An image
        that expired meanwhile is deleted by the next sweep once the last hold on it ends (not by the release
        itself, which runs on the event loop and must not wait for the disk)."""
        digests = [digest_of(image.reference) for image in images]
        with self._lock:
            for digest in digests:
                self._held[digest] = self._held.get(digest, 0) + 1
        try:
            yield
        finally:
            now = self._clock()
            with self._lock:
                for digest in digests:
                    self._held[digest] -= 1
                    if not self._held[digest]:
                        del self._held[digest]
                if any(self._expired(digest, now) for digest in digests):
                    self._next_expiry = now  # due: the next put, or the server's minute sweep, deletes it

    def sweep_if_due(self) -> int:
        """`sweep`, when an image has expired since the last one (cheap otherwise: one comparison)."""
        return self.sweep() if self._clock() >= self._next_expiry else 0

    def sweep(self) -> int:
        """Delete every expired image no request holds; how many were deleted."""
        with self._writing:
            now = self._clock()
            with self._lock:
                gone = [r for r in self._records.values() if self._expired(r.digest, now)]
                for record in gone:
                    del self._records[record.digest]
                    self._used -= record.size_bytes
                # Held images that expired are swept as their last hold ends, not by every put meanwhile.
                expiries = (r.expires_at for r in self._records.values() if r.expires_at > now)
                self._next_expiry = min(expiries, default=float("inf"))
            for record in gone:  # the record first: a crash between the two leaves an orphan, removed at start
                files.remove(files.record_path(self.directory, record.digest))
                files.remove(files.image_path(self.directory, record.digest))
        if gone:
            log.info("image store: %d expired image(s) deleted", len(gone))
        return len(gone)

    def _expired(self, digest: str, now: float) -> bool:
        """Under `_lock`."""
        record = self._records.get(digest)
        return record is not None and record.expires_at <= now and digest not in self._held

    # ---- state -------------------------------------------------------------------------------------------

    def _remember(self, record: Record) -> None:
        with self._lock:
            previous = self._records.get(record.digest)
            self._used += record.size_bytes - (previous.size_bytes if previous is not None else 0)
            self._records[record.digest] = record
            self._next_expiry = min(self._next_expiry, record.expires_at)

    def _stored(self, record: Record) -> StoredImage:
        return StoredImage(
            reference=REFERENCE_PREFIX + record.digest,
            path=files.image_path(self.directory, record.digest),
            width=record.width,
            height=record.height,
            mime_type=record.mime_type,
            expires_at=record.expires_at,
        )

    def _load(self) -> None:
        """Read the records a previous run left, remove what no record names (and stale temporary files), and
        sweep what expired while the server was down."""
        for record in records.read_all(self.directory):
            if files.image_path(self.directory, record.digest).exists():
                self._remember(record)
            else:
                files.remove(files.record_path(self.directory, record.digest))
        now = time.time()  # against files' modification times, whatever clock the expiries use
        for path in self.directory.iterdir():
            name = path.name
            orphan = files.is_digest(name) and name not in self._records
            stale_temp = name.startswith(files.TEMP_PREFIX) and now - path.stat().st_mtime > STALE_TEMP_S
            if orphan or stale_temp:
                files.remove(path)
        self.sweep()
        log.info("image store: %d image(s), %d bytes, in %s", len(self._records), self._used, self.directory)
