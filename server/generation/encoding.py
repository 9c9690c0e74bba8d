"""Finished images to bytes in the format a request asked for (PNG by default)."""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image

from server.domain import ImageFormat

# Lossy formats at qualities where artefacts are hard to see: callers who want smaller files re-encode, but
# they cannot get back detail we threw away.
_SAVE_ARGS: dict[ImageFormat, tuple[str, dict[str, object]]] = {
    ImageFormat.PNG: ("PNG", {}),
    ImageFormat.JPEG: ("JPEG", {"quality": 95}),
    ImageFormat.WEBP: ("WEBP", {"quality": 90}),
}


def encode_image(image: Image.Image, image_format: ImageFormat) -> bytes:
    """`image` encoded as `image_format`; its MIME type is `image_format.mime_type`."""
    pil_format, options = _SAVE_ARGS[image_format]
    if image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


# How finished images become bytes: `encode_image`, or a test's stand-in that waits or fails on purpose.
Encoder = Callable[[Image.Image, ImageFormat], bytes]
