"""Images a request starts from (GenerateRequest.image and mask): how one is named in a request, and how it
is uploaded when it is too large to go inline.

A source is bytes, a path, or a reference from an earlier upload or a kept result ("sha256:<64 hex>").
A request is limited to 128 KiB, so an image goes inline (`ImageInput.data`) only up to 96 KiB; a larger one is
sent once through `UploadImage` and named by its reference. `UploadImage` is client-streaming: a header with the
file's size and sha256 first, then the bytes in 64 KiB messages (the server refuses a message over 128 KiB).
The size and hash come first so that the server can refuse an upload over its limit or quota before any byte is
stored, and can tell a truncated or altered stream from the file; a file given by path is therefore read twice
(once to hash, once to send) rather than held whole in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from google.protobuf import duration_pb2

from refinery.v1 import generation_pb2 as pb

ImageSource = bytes | str | os.PathLike[str]
"""bytes of a PNG, JPEG or WebP; a path to one; or a reference ("sha256:<64 hex digits>")."""

INLINE_LIMIT = 96 * 1024  # ImageInput.data's limit: what fits a 128 KiB request beside the rest of it
CHUNK_BYTES = 64 * 1024  # well under the server's 128 KiB message limit, with room for the framing
_HASH_BLOCK = 1 << 20
_REFERENCE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class UploadedImage:
    """An image the server stored (UploadImageResponse): the reference to name it by in a request (`image=`,
    `mask=`), what the server read from its header, and until when it is kept (None: the server did not say)."""

    reference: str
    mime_type: str
    width: int
    height: int
    size_bytes: int
    expires: datetime | None


def is_reference(source: ImageSource) -> bool:
    """Whether `source` names a stored image ("sha256:<64 lowercase hex>") rather than a file."""
    return isinstance(source, str) and _REFERENCE.fullmatch(source) is not None


def needs_upload(source: ImageSource) -> bool:
    """Whether `source` is too large to go inline in a request (more than 96 KiB), so it must be uploaded."""
    return not is_reference(source) and _size(source) > INLINE_LIMIT


def image_input(source: ImageSource, field: str) -> pb.ImageInput:
    """The `ImageInput` naming `source`: its reference, or its bytes inline. ValueError, naming `field`, for a
    file or bytes over 96 KiB: those go through `upload_image` (or `Client.generate`, which uploads them)."""
    if isinstance(source, str) and is_reference(source):
        return pb.ImageInput(reference=source)
    size = _size(source)
    if size > INLINE_LIMIT:
        raise ValueError(
            f"{field}: {size} bytes is over the {INLINE_LIMIT // 1024} KiB a request can carry inline; upload it "
            "first (upload_image) and pass its reference, or let Client.generate upload it"
        )
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return pb.ImageInput(data=data)


def upload_header(source: ImageSource, keep_for: timedelta | float | None = None) -> pb.UploadHeader:
    """The first message of an upload: `source`'s size and sha256 (a file read once, whole), and `keep_for`
    (None: the server's default)."""
    if isinstance(source, str) and is_reference(source):
        raise ValueError(f"{source} is a reference to an image the server already holds: nothing to upload")
    size, sha256 = _measure(source)
    header = pb.UploadHeader(size_bytes=size, sha256=sha256)
    if keep_for is not None:
        header.keep_for.CopyFrom(duration(keep_for, "keep_for"))
    return header


def upload_requests(header: pb.UploadHeader, source: ImageSource) -> Iterator[pb.UploadImageRequest]:
    """The messages of one `UploadImage` stream: `header`, then the bytes in 64 KiB pieces (a file read again;
    a fresh iterator per attempt)."""
    yield pb.UploadImageRequest(header=header)
    if isinstance(source, bytes):
        view = memoryview(source)
        for start in range(0, len(view), CHUNK_BYTES):
            yield pb.UploadImageRequest(data=bytes(view[start : start + CHUNK_BYTES]))
        return
    # Read again rather than kept from hashing: the server's header check catches a file changed in between.
    with open(source, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            yield pb.UploadImageRequest(data=chunk)


def uploaded(response: pb.UploadImageResponse) -> UploadedImage:
    expires = response.expires.ToDatetime(UTC) if response.HasField("expires") else None
    return UploadedImage(
        response.reference, response.mime_type, response.width, response.height, response.size_bytes, expires
    )


def duration(value: timedelta | float, field: str) -> duration_pb2.Duration:
    """A time span as the contract's Duration: a timedelta, or seconds. ValueError, naming `field`, when it is
    negative or not finite."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{field}: expected a duration of 0 seconds or more, got {value!r}")
    message = duration_pb2.Duration()
    message.FromTimedelta(timedelta(seconds=seconds))
    return message


def _size(source: ImageSource) -> int:
    if isinstance(source, bytes):
        return len(source)
    return os.stat(source).st_size


def _measure(source: ImageSource) -> tuple[int, str]:
    """Size and sha256 from one reading, so that the header describes one version of a file."""
    if isinstance(source, bytes):
        return len(source), hashlib.sha256(source).hexdigest()
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()
