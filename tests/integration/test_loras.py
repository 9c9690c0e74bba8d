"""LoRAs per stage and prompts of any length through a real server on loopback, with the tiny pair and its
built-in tiny LoRAs (issue 17): images equal diffusers run by hand with `load_lora_weights` + `set_adapters`
over the same split, on the base, on the refiner and on both; compare with LoRAs; what each image reports; and
the refusals, each before any step runs."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc

from .conftest import ServerThread, bad_request_fields, collect, events, make_settings, new_stub
from .test_compare import _GatedRunner, _queued_together
from .test_generate import _ByHand

TINY_REFINER = "builtin:tiny-sdxl-refiner@1"
BASE_LORA, BASE_LORA_KOHYA, BASE_LORA_3 = (f"builtin:tiny-lora-base@{v}" for v in (1, 2, 3))
REFINER_LORA = "builtin:tiny-lora-refiner@1"
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def request(*, refiner: pb.Refiner | None = None, **fields: Any) -> pb.GenerateRequest:
    defaults: dict[str, Any] = {"positive_prompt": "a lighthouse on a cliff", "steps": 6, "seed": 42}
    message = pb.GenerateRequest(**{**defaults, **fields})
    if refiner is not None:
        message.refiner.CopyFrom(refiner)
    return message


def rgb(data: bytes) -> numpy.ndarray[Any, Any]:
    return numpy.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=numpy.int16)


class _ByHandLoras(_ByHand):
    """The hand-run of tests/integration/test_generate.py, with LoRAs loaded as diffusers documents it."""

    def with_loras(self, store: ModelStore, base: list[tuple[str, float]], refiner: list[tuple[str, float]]) -> None:
        for pipe, loras, prefix in ((self.base, base, "b"), (self.refiner, refiner, "r")):
            pipe.unload_lora_weights()
            for i, (air, _) in enumerate(loras):
                pipe.load_lora_weights(str(store.resolve(air).path), adapter_name=f"{prefix}{i}")
            if loras:
                pipe.set_adapters([f"{prefix}{i}" for i in range(len(loras))], [w for _, w in loras])


@pytest.fixture(scope="module")
def by_hand(model_store: ModelStore) -> Iterator[_ByHandLoras]:
    yield _ByHandLoras(model_store)


# (base LoRAs, refiner LoRAs, the refiner's start step of 6). The tiny refiner LoRA is weak over a refiner's few
# steps: a high weight and an early start make its effect show.
CASES = {
    "base": ([(BASE_LORA, 0.8)], [], 5),
    "refiner": ([], [(REFINER_LORA, 3.0)], 3),
    "both, kohya and stacked": ([(BASE_LORA_KOHYA, 1.0), (BASE_LORA_3, -0.6)], [(REFINER_LORA, 2.5)], 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_images_equal_diffusers_by_hand(
    stub: pb_grpc.GenerationServiceStub, by_hand: _ByHandLoras, model_store: ModelStore, case: str
) -> None:
    base, refiner, start = CASES[case]
    message = request(
        loras=[pb.Lora(model=m, weight=w) for m, w in base],
        refiner=pb.Refiner(
            model=TINY_REFINER, start_step=start, loras=[pb.Lora(model=m, weight=w) for m, w in refiner]
        ),
    )
    (image,) = events(collect(stub, message), "image")
    by_hand.with_loras(model_store, base, refiner)
    prompt, scheduler = message.positive_prompt, pb.SCHEDULER_EULER
    want = numpy.asarray(by_hand.generate(prompt, 6, start - 1, 42, scheduler), dtype=numpy.int16)
    assert numpy.abs(rgb(image.data) - want).max() == 0
    (plain,) = events(collect(stub, request(refiner=pb.Refiner(model=TINY_REFINER, start_step=start))), "image")
    assert numpy.abs(rgb(image.data) - rgb(plain.data)).mean() > 2.0  # the LoRAs did something
    assert [(lora.model, round(lora.weight, 3)) for lora in image.loras] == base
    assert [(lora.model, round(lora.weight, 3)) for lora in image.refiner_loras] == refiner


def test_compare_with_loras_equals_the_two_requests_it_replaces(stub: pb_grpc.GenerationServiceStub) -> None:
    loras = [pb.Lora(model=BASE_LORA, weight=1.2)]
    refiner_loras = [pb.Lora(model=REFINER_LORA)]
    compared = collect(
        stub,
        request(loras=loras, refiner=pb.Refiner(model=TINY_REFINER, start_step=4, compare=True, loras=refiner_loras)),
    )
    (alone,) = events(collect(stub, request(loras=loras)), "image")
    (refined,) = events(
        collect(stub, request(loras=loras, refiner=pb.Refiner(model=TINY_REFINER, start_step=4, loras=refiner_loras))),
        "image",
    )
    base_only, main = events(compared, "image")
    assert base_only.branch == pb.BRANCH_BASE_ONLY and list(base_only.refiner_loras) == []
    assert (rgb(base_only.data) == rgb(alone.data)).all()
    assert (rgb(main.data) == rgb(refined.data)).all()
    assert [lora.model for lora in main.refiner_loras] == [REFINER_LORA]


def test_long_prompts_are_read_whole_and_reported(stub: pb_grpc.GenerationServiceStub) -> None:
    long_prompt = ", ".join(f"detail number {i}" for i in range(60))  # about 240 tokens: 4 windows
    responses = collect(stub, request(positive_prompt=long_prompt, refiner=pb.Refiner(model=TINY_REFINER)))
    (image,) = events(responses, "image")
    read = {(t.stage, t.text_encoder): (t.positive_tokens, t.negative_tokens, t.chunks) for t in image.prompt_tokens}
    assert set(read) == {
        (pb.STAGE_BASE, "text_encoder"),
        (pb.STAGE_BASE, "text_encoder_2"),
        (pb.STAGE_REFINER, "text_encoder_2"),
    }
    positive, negative, chunks = read[(pb.STAGE_BASE, "text_encoder")]
    assert 225 < positive <= 300 and negative == 0 and chunks == 4
    assert len(set(read.values())) == 1
    # The tail of the prompt matters: cut at one window, it would render the same as its first 75 tokens.
    (cut,) = events(collect(stub, request(positive_prompt=", ".join(f"detail number {i}" for i in range(15)))), "image")
    assert (rgb(cut.data) != rgb(image.data)).any()


def _refused(stub: pb_grpc.GenerationServiceStub, message: pb.GenerateRequest) -> tuple[grpc.StatusCode, list[str]]:
    with pytest.raises(grpc.RpcError) as raised:
        collect(stub, message)
    return raised.value.code(), bad_request_fields(raised.value)


def test_bad_lora_fields_are_refused_naming_each(stub: pb_grpc.GenerationServiceStub) -> None:
    message = request(
        loras=[
            pb.Lora(model=BASE_LORA, weight=4.5),
            pb.Lora(model=BASE_LORA_3, weight=float("nan")),
            pb.Lora(model=BASE_LORA),
        ],
        refiner=pb.Refiner(model=TINY_REFINER, loras=[pb.Lora(model=REFINER_LORA)] * 2),
    )
    code, fields = _refused(stub, message)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["loras[0].weight", "loras[1].weight", "loras[2].model", "refiner.loras[1].model"]
    code, fields = _refused(stub, request(loras=[pb.Lora(model=BASE_LORA)] * 5))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "loras" in fields


def test_prompts_beyond_the_window_limit_and_bad_syntax_are_refused(stub: pb_grpc.GenerationServiceStub) -> None:
    code, fields = _refused(stub, request(positive_prompt="word " * 700))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["positive_prompt"])
    code, fields = _refused(
        stub, request(positive_prompt='("a cat", "a dog").blend(0.3)', prompt_weighting=pb.PROMPT_WEIGHTING_COMPEL)
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["positive_prompt"])


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("loras[0].model", request(loras=[pb.Lora(model="builtin:tiny-sdxl-base@2")])),  # a checkpoint
        ("refiner.loras[0].model", request(refiner=pb.Refiner(model=TINY_REFINER, loras=[pb.Lora(model=BASE_LORA)]))),
        ("loras[0].model", request(loras=[pb.Lora(model=REFINER_LORA)])),
    ],
    ids=["checkpoint as LoRA", "base LoRA on the refiner", "refiner LoRA on the base"],
)
def test_a_lora_that_cannot_serve_its_stage_fails_its_precondition(
    stub: pb_grpc.GenerationServiceStub, field: str, message: pb.GenerateRequest
) -> None:
    responses: list[pb.GenerateResponse] = []
    with pytest.raises(grpc.RpcError) as raised:
        for response in stub.Generate(message, timeout=120):
            responses.append(response)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert bad_request_fields(raised.value) == [field]
    assert not events(responses, "progress")  # refused before any step


def test_a_lora_for_another_architecture_or_of_missing_layers_is_refused(
    stub: pb_grpc.GenerationServiceStub, model_store: ModelStore, tmp_path: Path
) -> None:
    tensors = load_file(str(model_store.resolve(BASE_LORA).path))
    # Kept widths, other layer names: detected as a tiny-base LoRA, but most of its layers exist nowhere.
    elsewhere = {
        (key.replace("down_blocks.", "down_blocks.9") if i % 5 else key): value
        for i, (key, value) in enumerate(sorted(tensors.items()))
    }
    path = tmp_path / "elsewhere.safetensors"
    save_file(elsewhere, str(path))
    responses: list[pb.GenerateResponse] = []
    with pytest.raises(grpc.RpcError) as raised:
        for response in stub.Generate(request(loras=[pb.Lora(model=str(path))]), timeout=120):
            responses.append(response)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert bad_request_fields(raised.value) == ["loras[0].model"]
    assert not events(responses, "progress")
    # The server is unharmed: the same request without it renders as before.
    assert events(collect(stub, request()), "image")


@pytest.fixture(scope="module")
def gated(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[tuple[ServerThread, _GatedRunner]]:
    gate = _GatedRunner()
    thread = ServerThread(make_settings(store_settings, max_batch=4), store=model_store, run=gate)
    try:
        thread.wait_ready()
        yield thread, gate
    finally:
        gate.release.set()
        thread.close()


def test_equal_lora_sets_batch_together_and_equal_their_solo_runs(gated: tuple[ServerThread, _GatedRunner]) -> None:
    thread, gate = gated
    a = [pb.Lora(model=BASE_LORA, weight=0.8)]
    b = [pb.Lora(model=BASE_LORA_3)]
    messages = [
        request(seed=11, loras=a),
        request(seed=21, loras=a, positive_prompt="a bowl of ramen"),
        request(seed=31, loras=b),
        request(seed=41, loras=[pb.Lora(model=BASE_LORA, weight=0.5)]),  # the same LoRA at another weight
        request(seed=51),
    ]
    batched = _queued_together(thread, gate, messages)
    assert gate.batches == [(False, [11, 21]), (False, [31]), (False, [41]), (False, [51])]
    with grpc.insecure_channel(thread.address) as channel:
        stub = new_stub(channel)
        for message, responses in zip(messages, batched, strict=True):
            streamed = [r.WhichOneof("event") for r in responses]
            loads = [e for e in events(responses, "model_loading") if e.role != pb.MODEL_ROLE_LORA]
            assert not loads and "image" in streamed  # a LoRA never reloads the pair
            (alone,) = events(collect(stub, message), "image")
            got, want = rgb(events(responses, "image")[0].data), rgb(alone.data)
            # Denoised beside another image, a result may differ from its solo run by float rounding.
            assert numpy.abs(got - want).max() <= 2


def test_weighted_prompts_change_what_they_weight_and_nothing_else(stub: pb_grpc.GenerationServiceStub) -> None:
    def image(prompt: str, weighting: int) -> pb.Image:
        (found,) = events(collect(stub, request(positive_prompt=prompt, prompt_weighting=weighting)), "image")
        return found

    plain = image("a lighthouse on a cliff", pb.PROMPT_WEIGHTING_UNSPECIFIED)
    # Without syntax, every weighting reads the prompt as plain text.
    for weighting in (pb.PROMPT_WEIGHTING_COMPEL, pb.PROMPT_WEIGHTING_A1111):
        assert (rgb(image("a lighthouse on a cliff", weighting).data) == rgb(plain.data)).all()
    compel = image("a (lighthouse)1.4 on a cliff", pb.PROMPT_WEIGHTING_COMPEL)
    a1111 = image("a (lighthouse:1.4) on a cliff", pb.PROMPT_WEIGHTING_A1111)
    # compel's arithmetic for both; compel's pooled embedding reads the text as written (syntax included), A1111's
    # the text without it, so the two images are close but not equal (tests/test_prompts.py holds each exactly).
    for weighted in (compel, a1111):
        # The tiny text encoders are random, so the prompt moves the tiny pair's image little: any change shows.
        assert (rgb(weighted.data) != rgb(plain.data)).any()
        assert [t.positive_tokens for t in weighted.prompt_tokens] == [t.positive_tokens for t in plain.prompt_tokens]
