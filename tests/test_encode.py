"""Finished images come out in the requested format, decodable, at their size."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from server.core.domain import ImageFormat
from server.generation.encoding import encode_image


@pytest.mark.parametrize(
    ("image_format", "pil_format", "mime"),
    [
        (ImageFormat.PNG, "PNG", "image/png"),
        (ImageFormat.JPEG, "JPEG", "image/jpeg"),
        (ImageFormat.WEBP, "WEBP", "image/webp"),
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_formats_decode(image_format: ImageFormat, pil_format: str, mime: str, mode: str) -> None:
    source = Image.linear_gradient("L").resize((96, 64)).convert(mode)
    decoded = Image.open(io.BytesIO(encode_image(source, image_format)))
    assert decoded.format == pil_format
    assert image_format.mime_type == mime
    assert decoded.size == (96, 64) and decoded.mode == "RGB"


def test_png_is_lossless() -> None:
    source = Image.effect_noise((64, 64), 60).convert("RGB")
    decoded = Image.open(io.BytesIO(encode_image(source, ImageFormat.PNG)))
    assert decoded.tobytes() == source.tobytes()


def test_png_levels_trade_size_not_pixels() -> None:
    source = Image.linear_gradient("L").convert("RGB")
    stored, smallest = (
        encode_image(source, ImageFormat.PNG, png_level=0),
        encode_image(source, ImageFormat.PNG, png_level=9),
    )
    assert len(stored) > len(smallest)
    for data in (stored, smallest):
        assert Image.open(io.BytesIO(data)).tobytes() == source.tobytes()
