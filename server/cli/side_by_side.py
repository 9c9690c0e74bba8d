"""The picture `refinery generate --compare` writes: the base-only image and the refined one side by side,
labelled, the refined one on the right (where a reader's eye ends up).

Small images (the built-in tiny models make 64x64) are enlarged by a whole factor with nearest-neighbour
sampling so that each panel is at least `MIN_PANEL` pixels wide: the pixels stay the model's, only bigger, and
the labels fit. The two images themselves are written unchanged next to it.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

MIN_PANEL = 256
LEFT_LABEL = "base only"
RIGHT_LABEL = "refined"
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)


def side_by_side(base_only: Image.Image, refined: Image.Image) -> Image.Image:
    """One RGB picture: a label band over each image, `base_only` on the left, `refined` on the right."""
    scale = max(1, -(-MIN_PANEL // max(base_only.width, refined.width)))  # ceiling division
    panels = [_enlarged(base_only, scale), _enlarged(refined, scale)]
    width = max(p.width for p in panels)
    height = max(p.height for p in panels)
    font_size = max(14, width // 16)
    font = ImageFont.load_default(size=font_size)
    band = font_size * 2
    gap = max(4, width // 64)
    picture = Image.new("RGB", (2 * width + 3 * gap, band + height + gap), _BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for column, (panel, label) in enumerate(zip(panels, (LEFT_LABEL, RIGHT_LABEL), strict=True)):
        left = gap + column * (width + gap)
        picture.paste(panel, (left, band))
        # Centred over its panel: anchor "mm" puts the text's middle at the point.
        draw.text((left + width // 2, band // 2), label, fill=_INK, font=font, anchor="mm")
    return picture


def _enlarged(image: Image.Image, scale: int) -> Image.Image:
    rgb = image.convert("RGB")
    if scale == 1:
        return rgb
    return rgb.resize((rgb.width * scale, rgb.height * scale), Image.Resampling.NEAREST)
