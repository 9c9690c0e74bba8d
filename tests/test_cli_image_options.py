"""`refinery generate --image/--strength/--mask/--mask-blur/--mask-margin/--refine-only/--keep`: the flags as
parsed into the request, the refusals (a flag that needs another, a value out of range) in one line with exit
code 2 before any server starts, and the summary line's account of what ran. No server: the request is built
from the flags alone (an image of at most 96 KiB goes inline), and the report from Image values."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from refinery.client import Image, ImageMode
from refinery.v1 import generation_pb2 as pb
from server.cli.from_image import kept_text, steps_text
from server.cli.generate import build_request
from server.cli.main import build_parser, main
from server.cli.options import UsageError

REFERENCE = "sha256:" + "ab" * 32
PNG = b"\x89PNG\r\n\x1a\n a small stand-in"


def request(*flags: str) -> pb.GenerateRequest:
    return build_request(build_parser({}).parse_args(["generate", "a lighthouse", *flags]))


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(PNG)
    return path


def test_img2img_sends_the_image_and_its_strength(picture: Path) -> None:
    sent = request("--image", str(picture), "--strength", "0.6")
    assert sent.image == pb.ImageInput(data=PNG)  # small: inline
    assert sent.strength == pytest.approx(0.6)
    assert not sent.HasField("mask") and not sent.HasField("refiner") and not sent.HasField("keep_results")
    assert not request("--image", str(picture)).HasField("strength")  # the server's 0.8


def test_a_stored_image_is_named_by_its_reference() -> None:
    sent = request("--image", REFERENCE, "--mask", REFERENCE)
    assert sent.image == sent.mask == pb.ImageInput(reference=REFERENCE)


def test_inpainting_sends_the_mask_and_its_settings(picture: Path, tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"
    mask.write_bytes(b"mask bytes")
    sent = request("--image", str(picture), "--mask", str(mask), "--mask-blur", "8", "--mask-margin", "32")
    assert sent.mask == pb.ImageInput(data=b"mask bytes")
    assert (sent.mask_blur, sent.mask_margin) == (8, 32)


@pytest.mark.parametrize(
    ("flags", "model"), [((), ""), (("--refiner", "builtin:tiny-sdxl-refiner@1"), "builtin:tiny-sdxl-refiner@1")]
)
def test_refine_only_is_the_refiners_start_at_step_1(picture: Path, flags: tuple[str, ...], model: str) -> None:
    sent = request("--image", str(picture), "--refine-only", *flags)
    assert sent.refiner.WhichOneof("start") == "start_step" and sent.refiner.start_step == 1
    assert sent.refiner.model == model  # without --refiner: the server's default refiner


@pytest.mark.parametrize(("text", "kept"), [("1h30m", 5400), ("90s", 90), ("3600", 3600), ("2d", 172800)])
def test_keep_asks_the_server_to_keep_the_results(text: str, kept: int) -> None:
    assert request("--keep", text).keep_results.ToTimedelta() == timedelta(seconds=kept)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--refine-only",), "--refine-only needs --image"),
        (("--mask", REFERENCE), "--mask needs --image"),
        (("--strength", "0.5"), "--strength needs --image"),
        (("--image", REFERENCE, "--mask-blur", "4"), "--mask-blur needs --mask"),
        (("--image", REFERENCE, "--mask-margin", "16"), "--mask-margin needs --mask"),
        (("--image", REFERENCE, "--refine-only", "--refiner-start", "20"), "give it or --refiner-start, not both"),
    ],
)
def test_a_flag_without_the_one_it_needs_is_refused(
    flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        request(*flags)
    # Through the command: exit code 2 and one line, before a server would start in this process.
    assert main(["generate", "a lighthouse", *flags], env={}) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("refinery: error: ") and message in line


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--strength", "0", "strength is a number in (0, 1]"),
        ("--strength", "1.5", "strength is a number in (0, 1]"),
        ("--strength", "nan", "strength is a number in (0, 1]"),
        ("--strength", "half", "expected a number in (0, 1], got 'half'"),
        ("--mask-blur", "65", "must be in 0..64, got 65"),
        ("--mask-margin", "513", "must be in 0..512, got 513"),
        ("--mask-margin", "-1", "must be in 0..512, got -1"),
        ("--keep", "1x", "expected a duration like 3600, 90s, 30m, 1h or 1h30m, got '1x'"),
        ("--keep", "-5", "a duration is finite and 0 or more"),
        ("--image", "missing.png", "'missing.png' does not exist"),
        ("--mask", "sha256:ABC", "expected an image file or a reference sha256:<64 hex digits>"),
    ],
)
def test_a_bad_value_is_refused_in_one_line(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        request(flag, value)
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"refinery generate: error: argument {flag}: ") and message in error


def test_an_image_over_96_kib_is_left_to_the_upload(tmp_path: Path) -> None:
    """A request built alone refuses to carry it inline; the command uploads it once a server runs."""
    large = tmp_path / "large.png"
    large.write_bytes(bytes(96 * 1024 + 1))
    with pytest.raises(ValueError, match="image: 98305 bytes is over the 96 KiB a request can carry inline"):
        request("--image", str(large))


def result(**fields: object) -> Image:
    values: dict[str, object] = dict(
        request_id="r1", index=0, data=b"", mime_type="image/png", seed=7, width=64, height=64, base_steps=18,
        refiner_steps=2, model="builtin:tiny-sdxl-base@1", refiner_model="builtin:tiny-sdxl-refiner@1",
    )  # fmt: skip
    values.update(fields)
    return Image(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ({}, "18 base + 2 refiner steps"),
        ({"refiner_steps": 0, "refiner_model": "", "base_steps": 30}, "30 base steps"),
        (
            {"mode": ImageMode.IMG2IMG, "first_step": 16, "base_steps": 12, "refiner_steps": 3},
            "img2img from step 16: 12 base + 3 refiner steps",
        ),
        (
            {"mode": ImageMode.IMG2IMG, "first_step": 16, "base_steps": 0, "refiner_steps": 15},
            "img2img from step 16: refine-only, 15 refiner steps",
        ),
        (
            {"mode": ImageMode.INPAINT, "first_step": 7, "base_steps": 24, "refiner_steps": 0},
            "inpaint from step 7: 24 base steps",
        ),
    ],
)
def test_the_summary_says_the_mode_the_first_step_and_the_steps_that_ran(fields: dict[str, object], line: str) -> None:
    assert steps_text(result(**fields)) == line


def test_a_kept_result_is_reported_with_its_reference_and_expiry() -> None:
    until = datetime(2031, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert kept_text(result(reference=REFERENCE, reference_expires=until)) == (
        f", kept as {REFERENCE} until 2031-03-04 05:06:07 UTC"
    )
    assert kept_text(result()) == ""
