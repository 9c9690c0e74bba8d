"""What a source hands the downloader: the files of a model, each with what it must be (size, hashes) and a way
to find where its bytes are right now."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from modelstore.errors import IntegrityError


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
