"""Errors raised inside the server. Each maps to one gRPC status in `server/api/boundary.py`.

    ServerError
    ├── InvalidRequest      the request can never work as sent (INVALID_ARGUMENT + google.rpc.BadRequest)
    ├── JobCancelled        the client went away or cancelled (CANCELLED)
    ├── DeadlineExceeded    the client's deadline passed before the job could finish (DEADLINE_EXCEEDED)
    ├── Overloaded          the queue is full; retry after `retry_after_s` (RESOURCE_EXHAUSTED + RetryInfo)
    ├── OutOfDeviceMemory   the job does not fit on the device even after evicting idle models
    │                       (RESOURCE_EXHAUSTED)
    ├── ShuttingDown        the server is draining and takes no new work (UNAVAILABLE)
    ├── WorkerFailed        the device worker died while running the job (UNAVAILABLE)
    ├── DeliveryFailed      the request's images were made, but its client did not take the whole stream
    │                       (only logged and counted: the client is gone)
    ├── NotPinned           UnpinPair for a pair no device holds pinned (NOT_FOUND)
    └── ImageError          an input image cannot be used (INVALID_ARGUMENT); `field` names the request field
        ├── ImageNotFound   no such reference in the image store, or it expired (NOT_FOUND)
        ├── BadImage        not a PNG/JPEG/WebP, a decompression bomb, a bad size, bytes that disagree with
        │                   their upload header (INVALID_ARGUMENT)
        └── ImageStoreFull  over the image store's quota, or over its byte limit per image
                            (RESOURCE_EXHAUSTED, + RetryInfo when an expiry will make room)

Model-store errors (`modelstore.errors`) are mapped by the same table. Anything else is a bug: INTERNAL with a
generic message, and the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Self


class ServerError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class FieldViolation:
    """One bad field, named by its path in the request (`refiner.start_step`)."""

    field: str
    description: str
    reason: str = "INVALID_VALUE"


class InvalidRequest(ServerError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        if not violations:
            raise ValueError("InvalidRequest needs at least one violation")
        self.violations = tuple(violations)
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid request: {fields}: " + "; ".join(v.description for v in violations))


def too_much_work(work: float, limit: float) -> InvalidRequest:
    """The refusal of a request that asks for more than `limit` megapixel-steps; it names every field that
    makes up the work, since reducing any of them helps."""
    text = (
        f"the request asks for {work:.1f} megapixel-steps (width x height x number_results x steps); "
        f"this server allows {limit:.1f} per request"
    )
    return InvalidRequest(
        [FieldViolation(f, text, "TOO_MUCH_WORK") for f in ("width", "height", "number_results", "steps")]
    )


class DoesNotFit(ServerError):
    """A model a request field names cannot serve where it was asked to (a LoRA whose layers are not in the
    stage's models): FAILED_PRECONDITION naming `field`."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class JobCancelled(ServerError):
    pass


class DeadlineExceeded(ServerError):
    pass


class Overloaded(ServerError):
    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutOfDeviceMemory(ServerError):
    pass


class ShuttingDown(ServerError):
    pass


class WorkerFailed(ServerError):
    pass


class DeliveryFailed(ServerError):
    pass


class NotPinned(ServerError):
    pass


class ImageError(ServerError):
    """A problem with one image of a call. `field` is the request field it came from ("image.reference",
    "mask.data", "header.size_bytes"); the boundary names it in the message and in a google.rpc.BadRequest
    field violation. Empty: the image store does not know where the image came from (`at` says)."""

    reason = "BAD_IMAGE"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def at(self, field: str) -> Self:
        """The same error, naming `field` (the store raises it without one; the API knows the request's)."""
        named = copy.copy(self)
        named.field = field
        return named


class ImageNotFound(ImageError):
    reason = "IMAGE_NOT_FOUND"

    def __init__(self, reference: str, field: str = "") -> None:
        super().__init__(f"no image {reference} on this server (never uploaded, or expired)", field)
        self.reference = reference


class BadImage(ImageError):
    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(reason, field)


class ImageStoreFull(ImageError):
    """Over the store's quota (`retry_after_s`: when the next stored image expires, if that would make room),
    or an image over the byte limit per image (None: no retry helps)."""

    reason = "IMAGE_STORE_FULL"

    def __init__(self, message: str, field: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(message, field)
        self.retry_after_s = retry_after_s
