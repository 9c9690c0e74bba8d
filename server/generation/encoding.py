"""Finished images to bytes in the format a request asked for (PNG by default).

PNG is lossless at every zlib level; the level trades CPU for size. Pillow's default, 6, took 0.16-0.19 s per
1024x1024 image on the H200 machine's CPU; level 1 is several times faster for a few % more bytes
(benchmarks/bench_encode.py has the figures). Pillow compresses with the GIL released, so the service's encoder
threads encode the images of a batch at the same time.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image

from server.core.domain import ImageFormat

# Lossy formats at qualities where artefacts are hard to see: callers who want smaller files re-encode, but
# they cannot get back detail we threw away.
_SAVE_ARGS: dict[ImageFormat, tuple[str, dict[str, object]]] = {
    ImageFormat.PNG: ("PNG", {}),
    ImageFormat.JPEG: ("JPEG", {"quality": 95}),
    ImageFormat.WEBP: ("WEBP", {"quality": 90}),
}


DEFAULT_PNG_LEVEL = 1


def encode_image(image: Image.Image, image_format: ImageFormat, *, png_level: int = DEFAULT_PNG_LEVEL) -> bytes:
    """`image` encoded as `image_format`; its MIME type is `image_format.mime_type`. `png_level` is PNG's zlib
    level (0-9)."""
    pil_format, options = _SAVE_ARGS[image_format]
    if image_format is ImageFormat.PNG:
        options = {**options, "compress_level": png_level}
    if image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


# How finished images become bytes: `encode_image`, or a test's stand-in that waits or fails on purpose.
Encoder = Callable[[Image.Image, ImageFormat], bytes]
