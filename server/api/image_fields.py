"""The request's image fields (issue 18), checked at the edge with no I/O: `image`, `strength`, `mask`,
`mask_blur`, `mask_margin` and `keep_results`, every bad field named with the same violation collector as the
rest of `validation.py`.

What needs the image itself (does the reference exist, is the mask the image's size, do width and height agree
with it) is checked next, in `seed_inputs.py`, still before any work.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from refinery.v1 import generation_pb2 as pb
from server.core import domain
from server.core.settings import ImageSettings
from server.generation import start_index

# The whole request is limited to 128 KiB (settings `max_request_bytes`, sized for the server's memory bound):
# 96 KiB of image leaves room for the prompts and the rest; anything larger goes through UploadImage.
MAX_INLINE_BYTES = 96 * 1024
MAX_MASK_BLUR = 64  # pixels
MAX_MASK_MARGIN = 512  # pixels
DEFAULT_MAX_KEEP_S = 24 * 3600.0  # the server's limit on keep_results unless it says otherwise
REFERENCE = re.compile(r"sha256:[0-9a-f]{64}")

Report = Callable[..., None]  # validation's `_Violations`: (field, description[, reason])


@dataclass(frozen=True)
class ImageFieldLimits:
    """The server's limits on the image fields (settings `images`)."""

    max_keep_s: float = DEFAULT_MAX_KEEP_S  # keep_results at most this long
    inline_bytes: int = MAX_INLINE_BYTES  # ImageInput.data at most this long

    @classmethod
    def of(cls, images: ImageSettings) -> ImageFieldLimits:
        return cls(max_keep_s=images.max_keep_s, inline_bytes=images.inline_bytes)


DEFAULT_IMAGE_FIELD_LIMITS = ImageFieldLimits()


@dataclass(frozen=True)
class ImageFields:
    """What the image fields ask for, checked. Without an image: text-to-image, start_index 0."""

    from_image: bool
    start_index: int  # the grid index denoising starts at (steps - floor(steps x strength)), 0 without an image
    keep_results_s: float  # 0: results are not kept


def image_fields(request: pb.GenerateRequest, steps: int, limits: ImageFieldLimits, bad: Report) -> ImageFields:
    """Check the image fields of `request` (whose `steps` is already resolved: 0 became the default), reporting
    every bad one to `bad`."""
    from_image = request.HasField("image")
    if from_image:
        _input(request.image, "image", limits.inline_bytes, bad)
    start = _start_index(request, steps, bad)
    _mask(request, limits.inline_bytes, bad)
    return ImageFields(from_image, start, _keep_results(request, limits.max_keep_s, bad))


def _input(message: pb.ImageInput, field: str, inline_bytes: int, bad: Report) -> None:
    """One ImageInput: a well-formed reference, or inline bytes within the inline limit."""
    which = message.WhichOneof("source")
    if which is None:
        bad(field, "needs a source: reference (from UploadImage) or data (a PNG, JPEG or WebP)", "REQUIRED")
    elif which == "data":
        size = len(message.data)
        if not size:
            bad(f"{field}.data", "is empty: give the image's bytes (PNG, JPEG or WebP)", "REQUIRED")
        elif size > inline_bytes:
            bad(
                f"{field}.data",
                f"is {size} bytes; an inline image is at most {inline_bytes / 1024:g} KiB ({inline_bytes} bytes): "
                f"upload larger images with UploadImage and pass its reference",
            )
    elif not REFERENCE.fullmatch(message.reference):
        shown = message.reference if len(message.reference) <= 80 else message.reference[:80] + "..."
        bad(
            f"{field}.reference",
            f'must be "sha256:" and 64 lowercase hex digits, as UploadImage returns it, got {shown!r}',
            "MALFORMED",
        )


def _start_index(request: pb.GenerateRequest, steps: int, bad: Report) -> int:
    """Where denoising starts on the steps-long grid: 0 without an image, else after the steps strength skips."""
    from_image = request.HasField("image")
    strength = domain.DEFAULT_STRENGTH
    if request.HasField("strength"):
        strength = float(request.strength)  # float32 on the wire: start_index reads it to 4 decimals
        if not from_image:
            bad("strength", "needs image: strength says how much of the schedule runs over an input image")
            return 0
        if not math.isfinite(strength) or not 0.0 < strength <= 1.0:
            bad("strength", f"must be a finite number in (0, 1] (unset: {domain.DEFAULT_STRENGTH:g}), got {strength:g}")
            return 0
    if not from_image:
        return 0
    try:
        return start_index(steps, strength)
    except ValueError:
        bad(
            "strength",
            f"runs no step: floor(steps x strength) = floor({steps} x {strength:g}) is 0; "
            f"raise strength or steps so that at least one step runs",
        )
        return 0


def _mask(request: pb.GenerateRequest, inline_bytes: int, bad: Report) -> None:
    has_mask = request.HasField("mask")
    if has_mask:
        if not request.HasField("image"):
            bad("mask", "needs image: a mask says which part of the image to repaint")
        _input(request.mask, "mask", inline_bytes, bad)
    for name, most in (("mask_blur", MAX_MASK_BLUR), ("mask_margin", MAX_MASK_MARGIN)):
        value = getattr(request, name)
        if value > most:
            bad(name, f"must be in 0..{most} pixels, got {value}")
        elif value and not has_mask:
            bad(name, "needs mask: it applies to inpainting only")


def _keep_results(request: pb.GenerateRequest, max_keep_s: float, bad: Report) -> float:
    if not request.HasField("keep_results"):
        return 0.0
    keep = request.keep_results
    seconds = keep.seconds + keep.nanos / 1e9
    if abs(keep.nanos) >= 1_000_000_000 or keep.seconds * keep.nanos < 0:
        bad("keep_results", "is not a valid Duration: nanos must be within one second, of the same sign as seconds")
    elif seconds < 0:
        bad("keep_results", f"must not be negative (0 or unset: not kept), got {seconds:g} s")
    elif seconds > max_keep_s:
        limit = f"at most {max_keep_s:g} s" if max_keep_s > 0 else "0: this server keeps no results"
        bad("keep_results", f"must be {limit} (this server's limit), got {seconds:g} s")
    else:
        return seconds
    return 0.0
