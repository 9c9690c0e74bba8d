"""`refinery generate --lora`, `--refiner-lora` and `--prompt-weighting`: the flags as parsed into the request,
the one-line refusal of a bad weight, and the lines the command prints about what the server applied and read.
No server: the request is built from the flags alone, and the report from Image values."""

from __future__ import annotations

import re

import pytest

from refinery.client import AppliedLora, Image, Lora, PromptTokens, Stage
from refinery.v1 import generation_pb2 as pb
from server.cli.generate import build_request, loras_line, tokens_line
from server.cli.main import build_parser
from server.cli.options import lora


def request(*flags: str) -> pb.GenerateRequest:
    return build_request(build_parser({}).parse_args(["generate", "a lighthouse", *flags]))


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("builtin:tiny-lora-base@1", Lora("builtin:tiny-lora-base@1")),
        ("civitai:122359@135867:0.8", Lora("civitai:122359@135867", 0.8)),
        ("civitai:122359@135867:-4", Lora("civitai:122359@135867", -4.0)),
        ("builtin:tiny-lora-base@1:0", Lora("builtin:tiny-lora-base@1", 0.0)),  # allowed: applies nothing
        ("urn:air:sdxl:lora:civitai:122359@135867:1.5", Lora("urn:air:sdxl:lora:civitai:122359@135867", 1.5)),
        ("hf:owner/repo@main+lora.safetensors", Lora("hf:owner/repo@main+lora.safetensors")),
        # what follows the last ':' is a weight only when it reads as a number; else it is the AIR's own
        ("local:/models/style:v2.safetensors", Lora("local:/models/style:v2.safetensors")),
        ("/models/0.5", Lora("/models/0.5")),  # no ':' at all: a bare path, whatever its name
        (" builtin:tiny-lora-base@2 : 2 ", Lora("builtin:tiny-lora-base@2", 2.0)),
    ],
)
def test_an_air_with_or_without_a_weight(text: str, parsed: Lora) -> None:
    assert lora(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("builtin:tiny-lora-base@1:4.5", "a LoRA's weight is a number in -4..4, got '4.5'"),
        ("builtin:tiny-lora-base@1:-5", "a LoRA's weight is a number in -4..4, got '-5'"),
        ("builtin:tiny-lora-base@1:nan", "got 'nan'"),
        ("builtin:tiny-lora-base@1:inf", "got 'inf'"),
        ("builtin:tiny-lora-base@1:", "expected AIR or AIR:WEIGHT"),
        (":0.8", "expected AIR or AIR:WEIGHT"),
        ("", "expected AIR or AIR:WEIGHT"),
    ],
)
def test_a_bad_weight_is_refused_in_one_line_before_anything_starts(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        lora(text)
    for flag in ("--lora", "--refiner-lora"):
        with pytest.raises(SystemExit) as exited:
            request(flag, text)
        assert exited.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"refinery generate: error: argument {flag}: ") and message in error
        assert "Traceback" not in error


def test_loras_go_to_their_own_stage_in_order() -> None:
    sent = request(
        "--lora", "civitai:122359@135867:0.8", "--lora", "builtin:tiny-lora-base@1",
        "--refiner", "builtin:tiny-sdxl-refiner@1", "--refiner-lora", "builtin:tiny-lora-refiner@1:-1",
    )  # fmt: skip
    assert list(sent.loras) == [
        pb.Lora(model="civitai:122359@135867", weight=0.8),
        pb.Lora(model="builtin:tiny-lora-base@1"),
    ]
    assert not sent.loras[1].HasField("weight")  # no weight given: the server's default, not 0
    assert sent.refiner.model == "builtin:tiny-sdxl-refiner@1"
    assert list(sent.refiner.loras) == [pb.Lora(model="builtin:tiny-lora-refiner@1", weight=-1)]


def test_a_refiner_lora_alone_asks_for_the_servers_default_refiner() -> None:
    sent = request("--refiner-lora", "builtin:tiny-lora-refiner@1")
    assert sent.HasField("refiner") and sent.refiner.model == ""
    assert [lora.model for lora in sent.refiner.loras] == ["builtin:tiny-lora-refiner@1"]
    assert not sent.loras  # a refiner LoRA is never the base's


def test_base_loras_alone_run_no_refiner() -> None:
    sent = request("--lora", "builtin:tiny-lora-base@1")
    assert not sent.HasField("refiner")


@pytest.mark.parametrize(
    ("flags", "weighting"),
    [
        ((), pb.PROMPT_WEIGHTING_UNSPECIFIED),
        (("--prompt-weighting", "none"), pb.PROMPT_WEIGHTING_UNSPECIFIED),
        (("--prompt-weighting", "compel"), pb.PROMPT_WEIGHTING_COMPEL),
        (("--prompt-weighting", "a1111"), pb.PROMPT_WEIGHTING_A1111),
    ],
)
def test_prompt_weighting(flags: tuple[str, ...], weighting: int) -> None:
    assert request(*flags).prompt_weighting == weighting


def test_an_unknown_prompt_weighting_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        request("--prompt-weighting", "sd-webui")
    assert exited.value.code == 2
    assert "argument --prompt-weighting: invalid choice: 'sd-webui'" in capsys.readouterr().err


def image(**fields: object) -> Image:
    values: dict[str, object] = dict(
        request_id="r1", index=0, data=b"", mime_type="image/png", seed=7, width=64, height=64, base_steps=18,
        refiner_steps=2, model="builtin:tiny-sdxl-base@1", refiner_model="builtin:tiny-sdxl-refiner@1",
    )  # fmt: skip
    values.update(fields)
    return Image(**values)  # type: ignore[arg-type]


def test_the_report_names_the_loras_applied_per_stage() -> None:
    applied = image(
        loras=(AppliedLora("civitai:122359@135867", 0.800000011920929), AppliedLora("builtin:tiny-lora-base@1", 1)),
        refiner_loras=(AppliedLora("builtin:tiny-lora-refiner@1", -1.5),),
    )
    assert loras_line(applied) == (
        "loras: base civitai:122359@135867 (weight 0.8), builtin:tiny-lora-base@1 (weight 1); "
        "refiner builtin:tiny-lora-refiner@1 (weight -1.5)"
    )
    assert loras_line(image(refiner_loras=applied.refiner_loras)) == (
        "loras: refiner builtin:tiny-lora-refiner@1 (weight -1.5)"
    )
    assert loras_line(image()) == ""  # nothing to say without LoRAs: the output is what it was


def test_the_report_says_what_was_read_only_when_a_prompt_took_several_windows() -> None:
    one_window = (
        PromptTokens(Stage.BASE, "text_encoder", 12, 3, 1),
        PromptTokens(Stage.BASE, "text_encoder_2", 12, 3, 1),
        PromptTokens(Stage.REFINER, "text_encoder_2", 12, 3, 1),
    )
    assert tokens_line(image(prompt_tokens=one_window)) == ""
    assert tokens_line(image()) == ""  # a server that does not report tokens
    long = (
        PromptTokens(Stage.BASE, "text_encoder", 160, 3, 3),
        PromptTokens(Stage.BASE, "text_encoder_2", 160, 3, 3),
        PromptTokens(Stage.REFINER, "text_encoder_2", 12, 3, 1),  # the refiner's own, shorter prompt
    )
    assert tokens_line(image(prompt_tokens=long)) == (
        "tokens read (prompt + negative, in 75-token windows): base text_encoder 160 + 3 in 3, "
        "base text_encoder_2 160 + 3 in 3, refiner text_encoder_2 12 + 3 in 1"
    )
