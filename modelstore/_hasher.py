"""What a partial file must become: its running hashes and byte count, and the checks against what the source
published (size, SHA256, git's blob hash), made before the body is read, while it streams, and at the end."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, BinaryIO

from modelstore._digests import fast_hash
from modelstore._remote import RemoteFile
from modelstore.errors import IntegrityError

if TYPE_CHECKING:
    from _hashlib import HASH  # what hashlib's constructors return (a C type, only named in the stubs)

# civitai states sizes in KB with two decimals; allow rounding, and a little slack for how it was computed.
_APPROX_SLACK_BYTES = 4096
_APPROX_SLACK_RATIO = 0.005
_READ_CHUNK = 4 << 20


class Hasher:
    """The running hashes and byte count of one partial file, and the checks against what was published."""

    def __init__(self, file: RemoteFile) -> None:
        self._file = file
        self._expected_size = file.size
        self._reset()

    def _reset(self) -> None:
        self._sha256 = hashlib.sha256()
        self._fast = fast_hash()  # kept for the checks before later uses (_digests.py); costs ~1/10 of SHA256
        self._sha1: HASH | None = None
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
        while chunk := out.read(_READ_CHUNK):
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
        self._fast.update(chunk)
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

    @property
    def fast_digest(self) -> str:
        """The fast digest of the bytes so far (of the verified file, once `verify` has passed)."""
        return self._fast.hexdigest()

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
