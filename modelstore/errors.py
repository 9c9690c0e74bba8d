"""Errors raised by the model store.

Every error is a `ModelStoreError`. The tree says what went wrong in terms a caller can act on; the gRPC
server maps each class to a status code in one table, and a test checks that every class here has a row
there.

    ModelStoreError
    ├── InvalidModelId        the identifier is malformed (never retried)
    ├── ModelNotFound         the source does not know the model, version or file
    ├── WrongArchitecture     the model exists but is not what the role needs (e.g. SD 1.5 as an SDXL refiner,
    │   │                     a LoRA as a model, a LoRA trained for another model)
    │   └── NotALora          a checkpoint named where a LoRA is required
    ├── UnsafeCheckpoint      not a safetensors file (a pickle is refused and never unpickled), or a bad header
    ├── CorruptModel          the weights are incomplete or disagree with their configs: a component without
    │                         weights, tensors left unloaded, a broken tokenizer, wrong pipeline flags
    ├── IntegrityError        downloaded bytes do not match the source's size or SHA256
    ├── SourceUnauthenticated the source wants a token (CIVITAI_TOKEN / HF_TOKEN)
    ├── SourcePermissionDenied the token is not allowed to download this model
    ├── SourceRateLimited     the source asks us to slow down (retry_after_s when known)
    ├── SourceUnavailable     the source could not be reached or failed (retryable)
    ├── QuotaExceeded         the model cannot fit in the cache quota or on the disk
    ├── DiskFull              the disk holding the cache is full right now (retryable once space returns)
    ├── DownloadRefused       the operator's policy lets no request download this model (pull it first)
    │   └── ReadOnlyCache     the cache is a read-only shared volume: nothing is fetched, deleted, pinned or
    │                         repaired here (pull into the volume where it is filled)
    ├── ModelInUse            the model cannot be deleted while a job uses it
    └── DownloadAbandoned     every caller waiting for a download gave up; it stopped, its bytes are kept

Errors are values: they carry structured attributes (`air`, the canonical identifier of the model concerned
when it is known, and `source`) and are never changed once raised. The store's front door attaches the AIR it
was asked about, as a new error, to one raised below it without one; the gRPC edge, which knows the request,
names the request field from the AIR.

Messages never contain tokens or presigned URLs: sources redact them before raising.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from modelstore.role import Role


class ModelStoreError(Exception):
    """Root of the model store's errors. `air`: the canonical AIR (or, for a malformed one, the text as given)
    of the model concerned, when known."""

    def __init__(self, message: str, *, air: str | None = None) -> None:
        super().__init__(message)
        self._message = message
        self._air = air

    @property
    def message(self) -> str:
        return self._message

    @property
    def air(self) -> str | None:
        return self._air

    @property
    def source(self) -> str | None:
        """The source of `air` ("civitai", "huggingface", "builtin", "local"): the scheme of its canonical form
        (`AIR.canonical` always starts with it)."""
        return None if self._air is None else self._air.partition(":")[0]

    def about(self, air: str) -> ModelStoreError:
        """This error as a new value concerning `air` (this one is left as it is: other callers may hold it)."""
        # Not copy.copy: it rebuilds exceptions from `args`, which cannot carry the keyword-only attributes.
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.args = self.args
        clone._air = air
        return clone

    def __str__(self) -> str:
        return self._message


@contextlib.contextmanager
def concerning(air: str) -> Iterator[None]:
    """Errors raised in the block without an AIR leave it as new errors concerning `air` (a front door's way of
    saying which model its callers asked about)."""
    try:
        yield
    except ModelStoreError as exc:
        if exc.air is not None:
            raise
        raise exc.about(air) from exc.__cause__


class InvalidModelId(ModelStoreError):
    """The model identifier (AIR or path) is malformed. `air` is the text as given, so it names no source."""

    @property
    def source(self) -> str | None:
        return None


class ModelNotFound(ModelStoreError):
    """No such model, version or file at its source."""


class WrongArchitecture(ModelStoreError):
    """The model is not of the architecture `role` needs (None: not a checkpoint at all). `field`: the request
    field that named it, when the caller that checked it knew (a LoRA's, `role_policy.require_lora`), for the
    edge to report when no model field of its own matches."""

    def __init__(
        self,
        message: str,
        *,
        expected: str,
        found: str,
        role: Role | None = None,
        air: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, air=air)
        self.expected = expected
        self.found = found
        self.role = role
        self.field = field


class NotALora(WrongArchitecture):
    """A checkpoint was named where a LoRA is required (`field`, e.g. "loras[0].model")."""

    def __init__(self, message: str, *, found: str, field: str, air: str | None = None) -> None:
        super().__init__(message, expected="a LoRA", found=found, role=Role.LORA, air=air, field=field)


class UnsafeCheckpoint(ModelStoreError):
    """The file is not a well-formed safetensors file; it is refused and never deserialised."""


class CorruptModel(ModelStoreError):
    """The model's files are well-formed but do not make a complete, consistent pipeline.

    diffusers accepts many such models silently and fails later, or produces garbage (missing tensors stay on
    the `meta` device, a missing tokenizer folder becomes a 2-token tokenizer; shared/research/single-file.md
    P2, P8, P9); the loader checks for each and raises this instead.
    """


class IntegrityError(ModelStoreError):
    """Downloaded bytes do not match the size or SHA256 the source published."""


class SourceUnauthenticated(ModelStoreError):
    """The source needs credentials that were not given or were rejected."""


class SourcePermissionDenied(ModelStoreError):
    """The credentials are valid but may not download this model."""


class SourceRateLimited(ModelStoreError):
    """The source asked us to slow down."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, air: str | None = None) -> None:
        super().__init__(message, air=air)
        self.retry_after_s = retry_after_s


class SourceUnavailable(ModelStoreError):
    """The source could not be reached or answered with a server error; retrying later may help."""


class QuotaExceeded(ModelStoreError):
    """The model cannot fit in the cache quota or in the free disk space."""


class DiskFull(ModelStoreError):
    """The disk holding the model cache filled up while the model was being fetched (ENOSPC): the bytes
    received are kept, and the fetch resumes once space returns. `retry_after_s`: a suggested pause."""

    def __init__(self, message: str, *, retry_after_s: float = 60.0, air: str | None = None) -> None:
        super().__init__(message, air=air)
        self.retry_after_s = retry_after_s


class DownloadRefused(ModelStoreError):
    """The model is not cached, and the operator's on-demand policy lets no request download it: an operator
    pulls or pins it first (`modelstore.downloads`)."""


class ReadOnlyCache(DownloadRefused):
    """The cache is read-only (`StoreSettings.read_only`: a volume filled once and shared by many replicas), and
    what was asked needs a write: a model missing from it, a pull, delete, pin or repair. Someone with the
    volume writable (the pull Job) does it there."""


class ModelInUse(ModelStoreError):
    """The model is in use and cannot be deleted now."""


class DownloadAbandoned(ModelStoreError):
    """Everyone who asked for the model gave up (a cancelled pull or request), so its download stopped; the
    bytes received are kept, and the next request for it resumes from there."""
