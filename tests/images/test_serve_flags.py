"""`refinery serve`'s image store settings: flags over the environment over the defaults, each refused in one
line when it cannot be right, and a read-only model cache keeping images elsewhere."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from server.cli.main import build_parser
from server.cli.options import UsageError
from server.cli.serve import server_settings
from server.core.settings import ImageSettings


def _images(tmp_path: Path, *flags: str, **env: str) -> ImageSettings:
    args = build_parser(env).parse_args(["serve", "--cache-dir", str(tmp_path), *flags])
    return server_settings(args, env, in_process=False).images


def test_the_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    images = _images(tmp_path)
    assert images == ImageSettings()
    assert (images.max_bytes, images.max_pixels, images.quota_bytes) == (32 << 20, 2048 * 2048, 2 << 30)
    assert (images.default_keep_s, images.max_keep_s, images.inline_bytes) == (3600, 86400, 96 << 10)
    assert images.directory_in(tmp_path) == tmp_path / "images"


def test_flags_win_over_the_environment(tmp_path: Path) -> None:
    images = _images(
        tmp_path,
        "--image-quota", "1GiB", "--image-keep", "60", "--images-dir", str(tmp_path / "elsewhere"),
        REFINERY_IMAGE_QUOTA="5GiB", REFINERY_IMAGE_MAX_KEEP="600", REFINERY_IMAGE_MAX_BYTES="8MiB",
    )  # fmt: skip
    assert (images.quota_bytes, images.max_bytes) == (1 << 30, 8 << 20)
    assert (images.default_keep_s, images.max_keep_s) == (60, 600)
    assert images.directory_in(tmp_path) == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--image-quota", "0"), "--image-quota: must be a size of at least 1 byte"),
        (("--image-keep", "0"), "--image-keep: must be more than 0 seconds"),
        (("--image-inline-max", "200KiB"), "--image-inline-max: at most 98304 bytes"),
        (("--image-max-pixels", "0"), "--image-max-pixels: must be at least 1"),
    ],
)
def test_a_value_that_cannot_be_right_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], message: str
) -> None:
    with pytest.raises(SystemExit) as refused:
        _images(tmp_path, *flags)
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_a_default_time_beyond_the_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--image-keep 7200 is longer than --image-max-keep 3600"):
        _images(tmp_path, "--image-keep", "7200", "--image-max-keep", "3600")


def test_a_read_only_model_cache_keeps_images_in_the_temp_folder(tmp_path: Path) -> None:
    images = _images(tmp_path, "--cache-read-only")
    assert images.directory == Path(tempfile.gettempdir()) / "refinery-images"
