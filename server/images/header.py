"""What an image file is, read from its header before any pixel is decoded.

`PIL.Image.open` is lazy: it reads the format's header (PNG's IHDR, JPEG's SOF marker, WebP's VP8 chunk) and
stops. Everything here is decided from that: the format (by content, never by a name), the size, and the
limits. A decompression bomb (a file of a few hundred bytes that claims 100000 x 100000 pixels) is refused
from its claim: Pillow's own guard raises `DecompressionBombError` inside `open` for claims over twice its
`MAX_IMAGE_PIXELS` and warns over it, and our limits (`max_pixels`, far below Pillow's) catch the rest before
`load` could allocate anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from server.core.errors import BadImage

# Pillow's format name -> the MIME type the store records. Only these plugins are tried (`formats=`), so a
# file is identified by its bytes as one of them or refused: a GIF, a TIFF or an SVG never reaches a decoder.
MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
SIDE_MULTIPLE = 8  # the VAE works on 8 x 8 pixel blocks: a latent needs sides that are multiples of 8


@dataclass(frozen=True)
class ImageLimits:
    """What an input image may be: its file's bytes, each side, and its pixels."""

    max_bytes: int
    max_side: int
    max_pixels: int


@dataclass(frozen=True)
class ImageHeader:
    mime_type: str
    width: int
    height: int


def read_header(path: Path, limits: ImageLimits) -> ImageHeader:
    """The image at `path` (a file the store wrote, never a name from a client), checked against `limits` from
    its header, then its structure checked without decoding pixels (`verify`: a PNG's chunk checksums, so a
    truncated or damaged file is refused here rather than in a running request). Raises BadImage saying why."""
    kind = "image"
    try:
        with Image.open(path, formats=tuple(MIME_TYPES)) as image:
            kind = str(image.format)
            header = ImageHeader(MIME_TYPES[kind], *image.size)
            check_size(header.width, header.height, limits)
            image.verify()
    except UnidentifiedImageError:
        raise BadImage("not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Raised (or, under 2x Pillow's limit, warned) from the header's claim, before any pixel is decoded.
        raise BadImage(f"a decompression bomb: its header claims more than {limits.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for a damaged or truncated file
        raise BadImage(f"a damaged {kind} file ({exc})") from None
    return header


def check_size(width: int, height: int, limits: ImageLimits) -> None:
    """Refuse sides that are not multiples of 8, over the server's largest side, or too many pixels."""
    if width <= 0 or height <= 0:
        raise BadImage(f"the image is {width}x{height}: it has no pixels")
    if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
        raise BadImage(f"the image is {width}x{height}: both sides must be multiples of {SIDE_MULTIPLE}")
    if max(width, height) > limits.max_side:
        raise BadImage(f"the image is {width}x{height}: this server takes sides of at most {limits.max_side}")
    if width * height > limits.max_pixels:
        raise BadImage(f"the image is {width}x{height}: this server takes at most {limits.max_pixels} pixels")
