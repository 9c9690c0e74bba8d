"""A request's seed image and mask, read from the image store's file and made ready for diffusers, and the
paste-back of an inpainted result over the original.

Everything here is diffusers' own preprocessing, done per sample so that images of one batch may differ:

- **Blur**: `mask_blur` is `VaeImageProcessor.blur` on the mask, as diffusers' inpainting guide does before the
  call. The pipeline then binarises the mask at 0.5 for the latent blend; the blurred mask is what the paste-back
  uses, so the edge is soft there only.
- **Margin** (Runware's `maskMargin`, diffusers' `padding_mask_crop`): the crop is `get_crop_region(mask,
  width, height, pad)` (the mask's box grown by the margin and to the aspect of width x height), and the image and
  mask are cropped and resized with `resize_mode="fill"`, as diffusers does when given `padding_mask_crop`. The
  pipeline's own resize to width x height is then the identity (Pillow copies an image resized to its own size).
- **Paste-back**: `apply_overlay(mask, original, result, crop)`: where the mask is black the original's pixels
  are kept exactly; with a margin the result is first resized back into the crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from server.core.domain import SeedImage


@dataclass(frozen=True)
class PreparedSeed:
    """One sample's inputs as the pipeline takes them, and what its paste-back needs."""

    original: Image.Image  # RGB, the seed image's own size
    image: Image.Image  # RGB, width x height: the original, or the crop around the mask resized
    mask: Image.Image | None  # as the pipeline takes it (blurred; cropped like the image)
    paste_mask: Image.Image | None  # the blurred mask at the original's size
    crop: tuple[int, int, int, int] | None  # with a margin: where the crop came from


def prepare(
    seed: SeedImage, width: int, height: int, processor: VaeImageProcessor, mask_processor: VaeImageProcessor
) -> PreparedSeed:
    """Read `seed`'s files (checked when they were stored: format, sides, pixel count) and prepare them with the
    pipeline's image and mask processors."""
    original = _read(seed.image.path).convert("RGB")
    if seed.mask is None:
        return PreparedSeed(original, original, None, None, None)
    mask = _read(seed.mask.path)
    if seed.mask_blur:
        mask = VaeImageProcessor.blur(mask, seed.mask_blur)
    if not seed.mask_margin:
        return PreparedSeed(original, original, mask, mask, None)
    crop = VaeImageProcessor.get_crop_region(mask, width, height, pad=seed.mask_margin)
    image = processor.resize(original.crop(crop), height, width, resize_mode="fill")
    cropped_mask = mask_processor.resize(mask.crop(crop), height, width, resize_mode="fill")
    assert isinstance(image, Image.Image) and isinstance(cropped_mask, Image.Image)
    return PreparedSeed(original, image, cropped_mask, mask, crop)


def paste_back(seed: PreparedSeed, result: Image.Image, processor: VaeImageProcessor) -> Image.Image:
    """The inpainted `result` over the original outside the mask (and, with a margin, into its crop)."""
    if seed.paste_mask is None:
        return result
    pasted: Image.Image = processor.apply_overlay(seed.paste_mask, seed.original, result, seed.crop)
    return pasted


def _read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()
