"""`refinery serve`'s image store flags (README "Configuration"): where input images and kept results live, how
large they may be, how long they are kept and how much of the disk they may fill."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path

from modelstore import StoreSettings
from server.cli import options
from server.cli.options import UsageError, env_flag
from server.core.settings import ImageSettings

_DEFAULTS = ImageSettings()
# An inline image travels in a Generate request, which the server takes up to 128 KiB whole (prompts and all).
MAX_INLINE_BYTES = 96 * 1024


def add_image_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    group = parser.add_argument_group("image store (input images, kept results)")

    def flag(name: str, var: str, convert: options.Convert, default: str, help: str) -> None:
        env_flag(group, env, name, var=var, convert=convert, default=default, help=help)

    flag("--images-dir", "REFINERY_IMAGES_DIR", options.optional_directory, "", "default: images/ in the model cache")
    flag("--image-max-bytes", "REFINERY_IMAGE_MAX_BYTES", _positive_size, "32MiB", "one image's file (default 32MiB)")
    flag(
        "--image-max-pixels",
        "REFINERY_IMAGE_MAX_PIXELS",
        options.positive,
        str(_DEFAULTS.max_pixels),
        f"one image's width x height (default {_DEFAULTS.max_pixels}; each side also at most the largest result's)",
    )
    flag("--image-keep", "REFINERY_IMAGE_KEEP", _positive_seconds, "3600", "seconds an upload is kept (default 3600)")
    flag(
        "--image-max-keep",
        "REFINERY_IMAGE_MAX_KEEP",
        _positive_seconds,
        "86400",
        "the most seconds an upload or kept result may ask (default 86400)",
    )
    flag("--image-quota", "REFINERY_IMAGE_QUOTA", _positive_size, "2GiB", "all stored images together (default 2GiB)")
    flag(
        "--image-inline-max",
        "REFINERY_IMAGE_INLINE_MAX",
        _inline_size,
        "96KiB",
        "the largest image a request may carry inline (default and most 96KiB)",
    )


def image_settings(args: argparse.Namespace, store: StoreSettings) -> ImageSettings:
    """The flags' settings; for a command without them (the in-process server of `generate`), the defaults. A
    read-only model cache cannot hold images: they go to a per-process scratch folder instead."""
    directory: Path | None = getattr(args, "images_dir", None)
    if directory is None and store.read_only:
        directory = Path(tempfile.gettempdir()) / "refinery-images"
    if not hasattr(args, "image_keep"):
        return ImageSettings(directory=directory)
    if args.image_keep > args.image_max_keep:
        raise UsageError(
            f"--image-keep {args.image_keep:g} is longer than --image-max-keep {args.image_max_keep:g}: "
            "the default time kept must be allowed"
        )
    return ImageSettings(
        directory=directory,
        max_bytes=args.image_max_bytes,
        max_pixels=args.image_max_pixels,
        default_keep_s=args.image_keep,
        max_keep_s=args.image_max_keep,
        quota_bytes=args.image_quota,
        inline_bytes=args.image_inline_max,
    )


def _positive_size(text: str) -> int:
    value = options.size(text)
    if value <= 0:
        raise ValueError(f"must be a size of at least 1 byte, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = options.seconds(text)
    if value <= 0:
        raise ValueError(f"must be more than 0 seconds, got {text!r}")
    return value


def _inline_size(text: str) -> int:
    value = options.size(text)
    if value > MAX_INLINE_BYTES:
        raise ValueError(f"at most {MAX_INLINE_BYTES} bytes (96KiB: a request is limited to 128KiB), got {text!r}")
    return value
