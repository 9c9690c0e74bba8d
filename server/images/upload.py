"""An upload's bytes on their way to disk: written to a temporary file as they arrive (never the whole file in
memory), counted against the size the upload declared, and hashed as they pass.

`Upload` is the declared size, sha256 and time to keep; errors name the part of it (or "data") that the bytes
disagree with, as `ImageError.field`, for the API to spell as its request does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.core.errors import BadImage
from server.images import files

# `ImageError.field` values of upload errors: the parts of `Upload`, and the bytes.
SIZE, SHA256, KEEP_FOR, DATA = "size_bytes", "sha256", "keep_for", "data"


@dataclass(frozen=True)
class Upload:
    """What an upload says of itself before its bytes: their exact count, optionally their sha256 (hex), and
    how long to keep them (None or 0: the store's default)."""

    size_bytes: int
    sha256: str = ""
    keep_for_s: float | None = None

    def check(self) -> None:
        if self.size_bytes <= 0:
            raise BadImage("an upload must declare its size in bytes (more than 0)", SIZE)
        if self.sha256 and not files.is_digest(self.sha256.lower()):
            raise BadImage("not a sha256: expected 64 hex digits", SHA256)


class TempWriter:
    """A temporary file in `directory` receiving an upload's bytes. `close` removes it unless it was committed
    (renamed away); the store's `commit` does that with `file`."""

    def __init__(self, directory: Path, upload: Upload) -> None:
        self.upload = upload
        self.received = 0
        self.path, self.file = files.open_temp(directory)
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        """Blocking: call it off the event loop. BadImage (size) once the bytes exceed the declared size."""
        if self.received + len(chunk) > self.upload.size_bytes:
            raise BadImage(
                f"the upload sent more than the {self.upload.size_bytes} bytes its header declares; nothing was kept",
                SIZE,
            )
        self.file.write(chunk)
        self._hash.update(chunk)
        self.received += len(chunk)

    def finish(self) -> tuple[str, BinaryIO]:
        """The bytes' sha256 (hex) and the file, flushed, once the stream ended whole: every declared byte,
        matching the declared sha256. BadImage (size, sha256) otherwise."""
        declared = self.upload.size_bytes
        if self.received < declared:
            raise BadImage(
                f"the upload ended after {self.received} of the {declared} bytes its header declares; nothing was kept",
                SIZE,
            )
        digest = self._hash.hexdigest()
        if self.upload.sha256 and self.upload.sha256.lower() != digest:
            raise BadImage(f"the bytes received have sha256 {digest}, not the one the header declares", SHA256)
        self.file.flush()
        return digest, self.file

    def close(self) -> None:
        self.file.close()
        files.remove(self.path)
