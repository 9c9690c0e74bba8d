"""A validated job's input images, found in the image store (issue 18): the request's `image` and `mask` become
the job's `SeedImage`, and the job takes the image's size.

`validation.job_from_request` has checked the fields themselves (no I/O); here an inline image is stored (so the
device worker reads it from the cache volume like an uploaded one, never from the request held in RAM), a
reference is looked up, and what needs the image's size is checked: the mask's size, width and height, and the
work the request now asks for. Every refusal names its request field and comes before any work. Blocking (an
inline image is written to disk): the servicer runs it in a thread.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from refinery.v1 import generation_pb2 as pb
from server.api.validation import check_work
from server.core import domain
from server.core.errors import FieldViolation, ImageError, InvalidRequest
from server.core.settings import Limits


class ImageSource(Protocol):
    """What this needs of the image store (`server.images.ImageStore`)."""

    def find(self, reference: str) -> domain.StoredImage: ...

    def put_bytes(self, data: bytes, keep_for_s: float | None = None) -> domain.StoredImage: ...


def resolve(
    request: pb.GenerateRequest,
    job: domain.Job,
    store: ImageSource,
    limits: Limits,
    *,
    work_limit: float | None = None,
) -> domain.Job:
    """`job` (from `job_from_request(request)`) with its seed image found in `store`, and the image's size
    unless `mask_margin` crops. Raises the store's errors naming their field (`image.reference`: NOT_FOUND;
    `mask.data`: INVALID_ARGUMENT, ...), InvalidRequest for sizes that do not fit, and too much work at the
    image's size against `work_limit` (megapixel-steps). A text-to-image job is returned as it is."""
    if not request.HasField("image"):
        return job
    image = _stored(request.image, "image", store)
    mask = _stored(request.mask, "mask", store) if request.HasField("mask") else None
    bad: list[FieldViolation] = []
    size = f"{image.width}x{image.height}"
    if mask is not None and (mask.width, mask.height) != (image.width, image.height):
        bad.append(FieldViolation("mask", f"is {mask.width}x{mask.height}: a mask must be the image's size, {size}"))
    width, height = job.width, job.height  # with mask_margin: the crop's size (0: the model's native size)
    if not request.mask_margin:
        bad += _own_size(image, job, limits)
        width, height = image.width, image.height
    if bad:
        raise InvalidRequest(bad)
    seed = domain.SeedImage(image, mask, request.mask_blur, request.mask_margin)
    resolved = dataclasses.replace(job, width=width, height=height, seed_image=seed)
    check_work(resolved, work_limit)
    return resolved


def images_of(job: domain.Job) -> tuple[domain.StoredImage, ...]:
    """The stored images `job` reads, for the servicer to hold (`ImageStore.hold`) while the request runs."""
    seed = job.seed_image
    if seed is None:
        return ()
    return (seed.image,) if seed.mask is None else (seed.image, seed.mask)


def _stored(message: pb.ImageInput, field: str, store: ImageSource) -> domain.StoredImage:
    """The image one ImageInput names: looked up by reference, or the inline bytes stored for the store's
    default time (long enough for the request; sending them again extends it)."""
    try:
        if message.WhichOneof("source") == "reference":
            return store.find(message.reference)
        return store.put_bytes(message.data)
    except ImageError as exc:
        source = message.WhichOneof("source")
        raise exc.at(f"{field}.{source}") from None


def _own_size(image: domain.StoredImage, job: domain.Job, limits: Limits) -> list[FieldViolation]:
    """An image generated at its own size (no mask_margin): width and height, when given, must be its size,
    and its size must be one the server generates."""
    bad = []
    size = f"{image.width}x{image.height}"
    for name, asked, own in (("width", job.width, image.width), ("height", job.height, image.height)):
        if asked and asked != own:
            bad.append(
                FieldViolation(
                    name,
                    f"must be 0 or the image's {name}, {own} (the image is {size}; the result has its size unless "
                    f"mask_margin inpaints a crop), got {asked}",
                )
            )
    sides = (image.width, image.height)
    if any(side % 8 or not limits.min_side <= side <= limits.max_side for side in sides):
        bad.append(
            FieldViolation(
                "image",
                f"is {size}: the result has the image's size, so its sides must be multiples of 8 in "
                f"{limits.min_side}..{limits.max_side}",
            )
        )
    return bad
