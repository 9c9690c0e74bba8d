"""What a request starts from when it is not text alone: an image, and for inpainting a mask.

The images themselves live in the image store (`server/images/`) on the cache volume; these values name them
and say how they are used. Re-exported by `server.core.domain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class ImageMode(Enum):
    """What a request starts from: noise (text-to-image), an image (img2img), or an image and a mask."""

    TEXT = "text"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


@dataclass(frozen=True)
class StoredImage:
    """An image in the server's image store (`server/images/`), checked from its header when stored: named by
    its content, read from `path` (a name the store chose, never the client's) by the device worker."""

    reference: str  # "sha256:<64 hex>"
    path: Path
    width: int
    height: int
    mime_type: str
    expires_at: float = 0.0  # unix seconds: the store forgets it then (unless a running request holds it)


@dataclass(frozen=True)
class SeedImage:
    """The image a request starts from, and for inpainting its mask (white repaints). The same for every
    result of the request; images of one batch may differ."""

    image: StoredImage
    mask: StoredImage | None = None
    mask_blur: int = 0  # Gaussian radius (px) of the mask's edge for the paste-back
    mask_margin: int = 0  # > 0: inpaint only a crop around the mask, grown by this many pixels

    @property
    def mode(self) -> ImageMode:
        return ImageMode.INPAINT if self.mask is not None else ImageMode.IMG2IMG


DEFAULT_STRENGTH = 0.8  # Runware's
