"""`refinery generate`'s flags for starting from an image (README "Starting from an image"): img2img
(`--image`, `--strength`), inpainting (`--mask`, `--mask-blur`, `--mask-margin`), refine-only
(`--refine-only`: the refiner's start_step 1, so the refiner runs every step that runs), results kept on the
server (`--keep`), and how the summary line names what ran.

The image and mask are read when the request is sent: one of at most 96 KiB goes inline, a larger one is
uploaded first by the client (`refinery.client`, `prepare`).
"""

from __future__ import annotations

import argparse

from refinery.client import GenerateOptions, Image, ImageMode
from server.cli import options
from server.cli.options import UsageError


def add_flags(gen: argparse.ArgumentParser) -> None:
    image = options.argument_type(options.image_source)
    group = gen.add_argument_group("starting from an image")
    group.add_argument(
        "--image", type=image, metavar="PATH|sha256:...", help="img2img from this image (or a stored one's reference)"
    )
    group.add_argument(
        "--strength",
        type=options.argument_type(options.strength),
        metavar="0..1",
        help="how much of the schedule runs over the image: the last floor(steps x strength) steps (default 0.8)",
    )
    group.add_argument("--mask", type=image, metavar="PATH|sha256:...", help="inpaint: white repaints, black keeps")
    group.add_argument(
        "--mask-blur",
        type=options.argument_type(options.mask_blur),
        metavar=f"0..{options.MASK_BLUR_MAX}",
        help="blur radius (px) of the mask's edge where the result is pasted back (default 0)",
    )
    group.add_argument(
        "--mask-margin",
        type=options.argument_type(options.mask_margin),
        metavar=f"0..{options.MASK_MARGIN_MAX}",
        help="inpaint only a crop around the mask grown by this many px, at --size, pasted back (default 0: all)",
    )
    group.add_argument(
        "--refine-only",
        action="store_true",
        help="the refiner runs every step that runs (its start_step 1; the server's default refiner without --refiner)",
    )
    group.add_argument(
        "--keep",
        type=options.argument_type(options.duration),
        metavar="DURATION",
        help="keep the results on the server this long (e.g. 1h) and print their references",
    )


def image_options(args: argparse.Namespace) -> GenerateOptions:
    """The client's options for these flags (`GenerateOptions`' image fields). UsageError for a flag that
    needs another: --strength, --mask and --refine-only need --image; --mask-blur and --mask-margin need --mask;
    --refine-only says where the refiner starts, so it goes without --refiner-start."""
    needs = [
        ("--strength", args.strength is not None, "--image", args.image),
        ("--mask", args.mask is not None, "--image", args.image),
        ("--refine-only", args.refine_only, "--image", args.image),
        ("--mask-blur", args.mask_blur is not None, "--mask", args.mask),
        ("--mask-margin", args.mask_margin is not None, "--mask", args.mask),
    ]
    for flag, given, needed, present in needs:
        if given and present is None:
            raise UsageError(f"{flag} needs {needed}")
    if args.refine_only and args.refiner_start is not None:
        raise UsageError("--refine-only is the refiner's start at step 1: give it or --refiner-start, not both")
    return GenerateOptions(
        image=args.image,
        mask=args.mask,
        strength=args.strength,
        mask_blur=args.mask_blur or 0,
        mask_margin=args.mask_margin or 0,
        keep_results=args.keep,
    )


def steps_text(image: Image) -> str:
    """The steps that ran, as the summary line says them: "18 base + 2 refiner steps", and from an image its
    mode and first step on the request's grid ("img2img from step 16: 12 base + 3 refiner steps",
    "img2img from step 16: refine-only, 15 refiner steps")."""
    if image.mode is ImageMode.TEXT:
        return f"{_stages(image)} steps"
    ran = f"refine-only, {image.refiner_steps} refiner" if image.base_steps == 0 else _stages(image)
    return f"{image.mode} from step {image.first_step}: {ran} steps"


def _stages(image: Image) -> str:
    return f"{image.base_steps} base" + (f" + {image.refiner_steps} refiner" if image.refiner_steps else "")


def kept_text(image: Image) -> str:
    """ ", kept as sha256:... until <UTC time>" for a result the server keeps; "" otherwise."""
    if not image.reference:
        return ""
    until = f" until {image.reference_expires:%Y-%m-%d %H:%M:%S} UTC" if image.reference_expires else ""
    return f", kept as {image.reference}{until}"
