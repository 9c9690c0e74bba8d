"""Image files for the image store's tests, made in memory: real PNG/JPEG/WebP/GIF files, and PNG files whose
header claims what the test needs (a decompression bomb: a few hundred bytes that claim 100000 x 100000)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encoded(width: int = 64, height: int = 48, kind: str = "PNG", color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, kind)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` RGB pixels, with one tiny (wrong) IDAT: decoding it would
    allocate width x height x 3 bytes; reading its header costs nothing."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
