"""LoRAs per stage, prompt weighting and the token report in the typed client: the request `generate_request`
builds, and the Image event `to_event` makes of a response. No server: both are plain conversions."""

from __future__ import annotations

from typing import Any

import pytest

from refinery.client import (
    AppliedLora,
    Branch,
    Image,
    Lora,
    ModelLoading,
    PromptTokens,
    PromptWeighting,
    Refiner,
    Role,
    Stage,
    generate_request,
)
from refinery.client.events import to_event
from refinery.v1 import generation_pb2 as pb


def test_loras_go_to_their_own_stage_with_the_weight_only_when_given() -> None:
    request = generate_request(
        "a lighthouse",
        loras=[Lora("civitai:122359@135867", 0.8), Lora("builtin:tiny-lora-base@1")],
        refiner=Refiner(loras=(Lora("builtin:tiny-lora-refiner@1", 0.0),)),
    )
    assert list(request.loras) == [
        pb.Lora(model="civitai:122359@135867", weight=0.8),
        pb.Lora(model="builtin:tiny-lora-base@1"),
    ]
    assert not request.loras[1].HasField("weight")  # unset: the server's default (1), not 0
    assert list(request.refiner.loras) == [pb.Lora(model="builtin:tiny-lora-refiner@1", weight=0.0)]
    assert request.refiner.loras[0].HasField("weight")  # an explicit 0 is sent: it applies nothing


def test_a_request_without_loras_or_weighting_is_the_request_it_always_was() -> None:
    request = generate_request("a lighthouse", refiner=Refiner(start_step=19))
    assert not request.loras and not request.refiner.loras
    assert request.prompt_weighting == pb.PROMPT_WEIGHTING_UNSPECIFIED
    assert request == pb.GenerateRequest(positive_prompt="a lighthouse", refiner=pb.Refiner(start_step=19))


def test_a_refiner_keeps_its_loras_as_a_tuple_not_the_callers_list() -> None:
    given = [Lora("builtin:tiny-lora-refiner@1")]
    refiner = Refiner(loras=given)
    given.append(Lora("builtin:tiny-lora-refiner@2"))
    assert refiner.loras == (Lora("builtin:tiny-lora-refiner@1"),)
    assert hash(refiner) == hash(Refiner(loras=[Lora("builtin:tiny-lora-refiner@1")]))


@pytest.mark.parametrize(
    ("weighting", "sent"),
    [
        (PromptWeighting.NONE, pb.PROMPT_WEIGHTING_UNSPECIFIED),
        ("none", pb.PROMPT_WEIGHTING_UNSPECIFIED),
        (PromptWeighting.COMPEL, pb.PROMPT_WEIGHTING_COMPEL),
        ("compel", pb.PROMPT_WEIGHTING_COMPEL),
        ("a1111", pb.PROMPT_WEIGHTING_A1111),
        (None, pb.PROMPT_WEIGHTING_UNSPECIFIED),
    ],
)
def test_prompt_weighting_by_member_or_name(weighting: PromptWeighting | str | None, sent: int) -> None:
    assert generate_request("a (red)1.3 cat", prompt_weighting=weighting).prompt_weighting == sent


def test_an_unknown_weighting_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="'A1111 '"):
        generate_request("a cat", prompt_weighting="A1111 ")


def image_response(**image: Any) -> pb.GenerateResponse:
    meta = pb.Image(index=0, mime_type="image/png", seed=7, width=64, height=64, base_steps=18, refiner_steps=2)
    meta.MergeFrom(pb.Image(**image))
    return pb.GenerateResponse(request_id="r1", image=meta)


def test_an_image_reports_the_loras_applied_and_the_tokens_read() -> None:
    response = image_response(
        loras=[pb.Lora(model="civitai:122359@135867", weight=0.75), pb.Lora(model="builtin:tiny-lora-base@1")],
        refiner_loras=[pb.Lora(model="builtin:tiny-lora-refiner@1", weight=-1.5)],
        prompt_tokens=[
            pb.PromptTokens(
                stage=pb.STAGE_BASE, text_encoder="text_encoder", positive_tokens=160, negative_tokens=3, chunks=3
            ),
            pb.PromptTokens(
                stage=pb.STAGE_REFINER, text_encoder="text_encoder_2", positive_tokens=12, negative_tokens=0, chunks=1
            ),
        ],
    )
    image = to_event(response, response.image)
    assert isinstance(image, Image)
    assert image.loras == (
        AppliedLora("civitai:122359@135867", 0.75),
        AppliedLora("builtin:tiny-lora-base@1", 1.0),  # unset on the wire: the contract's default
    )
    assert image.refiner_loras == (AppliedLora("builtin:tiny-lora-refiner@1", -1.5),)
    assert image.prompt_tokens == (
        PromptTokens(Stage.BASE, "text_encoder", 160, 3, 3),
        PromptTokens(Stage.REFINER, "text_encoder_2", 12, 0, 1),
    )


def test_an_image_from_a_server_without_loras_has_empty_reports() -> None:
    response = image_response(branch=pb.BRANCH_BASE_ONLY)
    image = to_event(response, response.image)
    assert isinstance(image, Image)
    assert (image.loras, image.refiner_loras, image.prompt_tokens) == ((), (), ())
    assert image.branch is Branch.BASE_ONLY


def test_a_lora_being_loaded_says_so() -> None:
    response = pb.GenerateResponse(
        request_id="r1",
        model_loading=pb.ModelLoading(
            model="builtin:tiny-lora-base@1", role=pb.MODEL_ROLE_LORA, phase=pb.ModelLoading.PHASE_LOADING
        ),
    )
    event = to_event(response, None)
    assert isinstance(event, ModelLoading)
    assert event.role is Role.LORA
