"""`refinery generate --compare` and the refiner's flags, as a user runs them: a real process, real files."""

from __future__ import annotations

from pathlib import Path

import numpy
from PIL import Image

from server.cli.generate import build_request, output_path
from server.cli.main import build_parser
from server.cli.side_by_side import MIN_PANEL

from .conftest import ServerThread
from .test_cli import refinery


def test_refiner_flags_become_the_request() -> None:
    args = build_parser({}).parse_args(
        ["generate", "a cat", "--compare", "--aesthetic-score", "7.5", "--negative-aesthetic-score", "0",
         "--refiner-prompt", "a sharp photo", "--refiner-negative", ""]
    )  # fmt: skip
    refiner = build_request(args).refiner
    assert refiner.model == ""  # any refiner flag alone: the server's default refiner
    assert refiner.compare
    assert (refiner.aesthetic_score, refiner.negative_aesthetic_score) == (7.5, 0.0)
    assert refiner.HasField("negative_aesthetic_score")  # an explicit 0 is sent, not dropped as "unset"
    assert (refiner.positive_prompt, refiner.negative_prompt) == ("a sharp photo", "")
    assert refiner.HasField("negative_prompt")  # an empty refiner negative means "none", unlike unset

    unset = build_request(build_parser({}).parse_args(["generate", "a cat", "--refiner-start", "80%"])).refiner
    assert not unset.compare
    for name in ("aesthetic_score", "negative_aesthetic_score", "positive_prompt", "negative_prompt"):
        assert not unset.HasField(name)


def test_compare_paths() -> None:
    assert output_path(Path("bike.png"), 0, 1, "base-only") == Path("bike-base-only.png")
    assert output_path(Path("out/bike.png"), 1, 2, "compare") == Path("out/bike-1-compare.png")


def test_generate_compare_writes_both_images_and_a_picture_of_them(tmp_path: Path, server: ServerThread) -> None:
    result = refinery(
        "generate", "a cat", "--server", server.address, "--steps", "5", "--seed", "3", "-n", "2", "--compare",
        "--aesthetic-score", "8", "-o", "cat.png", cache=tmp_path / "unused-cache", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "base-only" in result.stderr  # the progress of the base alone is shown as such
    for index, seed in ((0, 3), (1, 4)):
        refined = _rgb(tmp_path / f"cat-{index}.png")
        alone = _rgb(tmp_path / f"cat-{index}-base-only.png")
        picture = _rgb(tmp_path / f"cat-{index}-compare.png")
        assert refined.size == alone.size == (64, 64) and refined.tobytes() != alone.tobytes()
        assert f"cat-{index}-base-only.png (64x64, image/png, seed {seed}, base only)" in result.stdout
        assert f"cat-{index}-compare.png" in result.stdout

        # Each panel is its image enlarged (4x: at least MIN_PANEL wide), the base alone left, the refined right,
        # under a band of dark label text on white.
        scale = MIN_PANEL // 64
        panel = alone.resize((64 * scale, 64 * scale), Image.Resampling.NEAREST)
        top = picture.height - panel.height - _gap(picture, panel)
        left_box = (_gap(picture, panel), top, _gap(picture, panel) + panel.width, top + panel.height)
        right_x = picture.width - _gap(picture, panel) - panel.width
        assert picture.crop(left_box).tobytes() == panel.tobytes()
        right = refined.resize(panel.size, Image.Resampling.NEAREST)
        assert picture.crop((right_x, top, right_x + panel.width, top + panel.height)).tobytes() == right.tobytes()
        band = numpy.asarray(picture.crop((0, 0, picture.width, top)).convert("L"))
        half = band.shape[1] // 2
        assert band.max() == 255 and band[:, :half].min() < 64 and band[:, half:].min() < 64  # a label over each


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _gap(picture: Image.Image, panel: Image.Image) -> int:
    """Three gaps sit beside the two panels: left, between, right."""
    return (picture.width - 2 * panel.width) // 3
