"""What the store accepts is decided from the file's header, by content, before any pixel is decoded."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from server.core.errors import BadImage
from server.images import ImageHeader, ImageLimits, read_header

from .pictures import encoded, png_claiming

LIMITS = ImageLimits(max_bytes=1 << 20, max_side=2048, max_pixels=1024 * 1024)


def _file(tmp_path: Path, data: bytes, name: str = "upload") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("kind", "mime_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_png_jpeg_and_webp_are_read_from_their_header(tmp_path: Path, kind: str, mime_type: str) -> None:
    assert read_header(_file(tmp_path, encoded(64, 48, kind)), LIMITS) == ImageHeader(mime_type, 64, 48)


def test_the_format_is_the_content_s_not_the_name_s(tmp_path: Path) -> None:
    assert read_header(_file(tmp_path, encoded(64, 48, "JPEG"), "picture.png"), LIMITS).mime_type == "image/jpeg"


@pytest.mark.parametrize("data", [encoded(64, 48, "GIF"), encoded(64, 48, "BMP"), b"just some text", b""])
def test_other_formats_and_non_images_are_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(BadImage, match="not a PNG, JPEG or WebP image"):
        read_header(_file(tmp_path, data), LIMITS)


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path: Path) -> None:
    bomb = _file(tmp_path, png_claiming(100_000, 100_000))  # 30 GB of pixels, in 100 bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadImage, match="decompression bomb"):
        read_header(bomb, LIMITS)
    # ru_maxrss is the process's peak, in KiB: a decode would have raised it by gigabytes.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 8 * 1024


def test_a_claim_under_pillow_s_own_guard_is_refused_by_the_server_s_pixel_limit(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="at most 1048576 pixels"):
        read_header(_file(tmp_path, png_claiming(2048, 1024)), LIMITS)


@pytest.mark.parametrize(
    ("width", "height", "why"),
    [
        (60, 48, "multiples of 8"),
        (64, 44, "multiples of 8"),
        (4096, 8, "sides of at most 2048"),
        (2048, 1024, "at most 1048576 pixels"),
    ],
)
def test_sizes_the_server_cannot_use_are_refused(tmp_path: Path, width: int, height: int, why: str) -> None:
    with pytest.raises(BadImage, match=why):
        read_header(_file(tmp_path, encoded(width, height)), LIMITS)


def test_a_truncated_png_is_refused(tmp_path: Path) -> None:
    data = encoded(256, 256, color="blue")
    with pytest.raises(BadImage, match="damaged PNG"):
        read_header(_file(tmp_path, data[: len(data) // 2]), LIMITS)
