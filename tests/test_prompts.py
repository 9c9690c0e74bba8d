"""Text conditioning of any length, plain or weighted, on the tiny SDXL pipelines (the real SDXL tokenizers)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from compel import Compel, CompelForSDXL, ReturnedEmbeddingsType  # type: ignore[import-untyped]

from modelstore import ModelStore, Role, load_pipeline
from server.core.domain import PromptWeighting, Sample, Stage
from server.core.prompt_tokens import PromptSyntaxError, chunks_for, count_tokens, tokenizer_counts
from server.generation.prompts import WINDOW, encode, window_ids

W = PromptWeighting
LONG = ", ".join(["a red cat sitting on a mat"] * 30)  # 239 tokens: 4 windows
NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@pytest.fixture(scope="module")
def base(model_store: ModelStore) -> Any:
    return load_pipeline(
        model_store.resolve("builtin:tiny-sdxl-base@1"), role=Role.BASE, device="cpu", dtype=torch.float32
    )


@pytest.fixture(scope="module")
def refiner(model_store: ModelStore) -> Any:
    air = model_store.resolve("builtin:tiny-sdxl-refiner@1")
    return load_pipeline(air, role=Role.REFINER, device="cpu", dtype=torch.float32)


def _stage(pipe: Any) -> Stage:
    return Stage.BASE if pipe.text_encoder is not None else Stage.REFINER


def _today(pipe: Any, samples: list[Sample], use_cfg: bool) -> dict[str, torch.Tensor]:
    """The runner's encoding before long prompts: encode_prompt per sample, stacked."""
    parts = [
        pipe.encode_prompt(
            prompt=s.prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=use_cfg,
            negative_prompt=s.negative_prompt,
        )
        for s in samples
    ]  # fmt: skip
    return {n: torch.cat([p[i] for p in parts]) for i, n in enumerate(NAMES) if parts[0][i] is not None}


def _window(pipe: Any, encoder: str, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One window encoded alone, straight through the text encoder."""
    tokenizer = pipe.tokenizer if encoder == "text_encoder" else pipe.tokenizer_2
    with torch.no_grad():
        out = getattr(pipe, encoder)(torch.tensor([window_ids(tokenizer, token_ids)]), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _ids(pipe: Any, text: str) -> list[int]:
    return list(pipe.tokenizer_2(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("which", ["base", "refiner"])
@pytest.mark.parametrize("use_cfg", [True, False])
def test_short_prompts_are_unchanged(which: str, use_cfg: bool, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(which)
    samples = [Sample("a photo of a cat", None, 1), Sample("a red bicycle!", "blurry, ugly", 2)]
    got = encode(pipe, samples, _stage(pipe), "cpu", use_cfg).tensors
    expected = _today(pipe, samples, use_cfg)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_long_prompt_windows(base: Any) -> None:
    c = encode(base, [Sample(LONG, "blurry", 1)], Stage.BASE, "cpu", True)
    embeds, negative = c.tensors["prompt_embeds"], c.tensors["negative_prompt_embeds"]
    assert embeds.shape[1] == negative.shape[1] == 4 * WINDOW
    ids = _ids(base, LONG)
    assert len(ids) == 239
    width_1 = base.text_encoder.config.hidden_size
    for k in range(4):
        window = ids[75 * k : 75 * (k + 1)]
        left, _ = _window(base, "text_encoder", window)
        right, pooled = _window(base, "text_encoder_2", window)
        got = embeds[:, WINDOW * k : WINDOW * (k + 1)]
        assert torch.equal(got[..., :width_1], left) and torch.equal(got[..., width_1:], right)
        if k == 0:
            assert torch.equal(c.tensors["pooled_prompt_embeds"], pooled)
    # The negative: its own window, then empty windows ([BOS][EOS] + padding)
    first, pooled = _window(base, "text_encoder_2", _ids(base, "blurry"))
    empty, _ = _window(base, "text_encoder_2", [])
    assert torch.equal(negative[:, :WINDOW, width_1:], first)
    assert torch.equal(c.tensors["negative_pooled_prompt_embeds"], pooled)
    for k in range(1, 4):
        assert torch.equal(negative[:, WINDOW * k : WINDOW * (k + 1), width_1:], empty)
    assert not torch.equal(empty, first)


def test_a_long_negative_pads_the_positive(refiner: Any) -> None:
    c = encode(refiner, [Sample("a cat", LONG, 1)], Stage.REFINER, "cpu", True)
    assert c.tensors["prompt_embeds"].shape == c.tensors["negative_prompt_embeds"].shape
    assert c.tensors["prompt_embeds"].shape[1] == 4 * WINDOW
    empty, _ = _window(refiner, "text_encoder_2", [])
    assert torch.equal(c.tensors["prompt_embeds"][:, 3 * WINDOW :], empty)


def test_no_negative_prompt(base: Any, refiner: Any) -> None:
    # SDXL base: zeros, of the padded shape
    c = encode(base, [Sample(LONG, None, 1)], Stage.BASE, "cpu", True)
    assert c.tensors["negative_prompt_embeds"].shape == c.tensors["prompt_embeds"].shape
    assert not c.tensors["negative_prompt_embeds"].any() and not c.tensors["negative_pooled_prompt_embeds"].any()
    # the refiner does not zero: the empty prompt, in as many windows
    c = encode(refiner, [Sample(LONG, None, 1)], Stage.REFINER, "cpu", True)
    as_empty = encode(refiner, [Sample(LONG, "", 1)], Stage.REFINER, "cpu", True)
    for name in NAMES:
        assert torch.equal(c.tensors[name], as_empty.tensors[name]), name
    # without guidance there is no negative side
    assert set(encode(base, [Sample(LONG, None, 1)], Stage.BASE, "cpu", False).tensors) == set(NAMES[::2])


def test_encoders_reading_different_lengths_share_the_windows(base: Any, refiner: Any) -> None:
    # 74 words and "!!": 75 tokens for tokenizer, 76 for tokenizer_2 (its pad token `!` is a token of its own)
    prompt = "cat " * 74 + "!!"
    assert tokenizer_counts(prompt, W.NONE) == (75, 76)
    c = encode(base, [Sample(prompt, "x", 1)], Stage.BASE, "cpu", True)
    assert c.tensors["prompt_embeds"].shape[1] == 2 * WINDOW
    width_1 = base.text_encoder.config.hidden_size
    empty_1, _ = _window(base, "text_encoder", [])
    assert torch.equal(c.tensors["prompt_embeds"][:, WINDOW:, :width_1], empty_1)  # padded, not cut
    assert [(t.encoder, t.positive, t.chunks) for t in c.tokens[0]] == [
        ("text_encoder", 75, 2),
        ("text_encoder_2", 76, 2),
    ]
    # The refiner reads 76 too, and its window count is the edge's
    r = encode(refiner, [Sample(prompt, None, 1)], Stage.REFINER, "cpu", True)
    assert r.tensors["prompt_embeds"].shape[1] == 2 * WINDOW


@pytest.mark.parametrize("negative", [None, "blurry, (ugly)0.8"])
def test_compel_weighting_is_compels(base: Any, negative: str | None) -> None:
    prompt = "a (red cat)1.3 on a mat--, (photo)++"
    c = encode(base, [Sample(prompt, negative, 1, weighting=W.COMPEL)], Stage.BASE, "cpu", True)
    with torch.no_grad():
        own = CompelForSDXL(base)(prompt, negative_prompt=negative if negative is not None else "")
    assert torch.equal(c.tensors["prompt_embeds"], own.embeds)
    assert torch.equal(c.tensors["pooled_prompt_embeds"], own.pooled_embeds)
    if negative is not None:
        assert torch.equal(c.tensors["negative_prompt_embeds"], own.negative_embeds)
        assert torch.equal(c.tensors["negative_pooled_prompt_embeds"], own.negative_pooled_embeds)
    plain = encode(base, [Sample(prompt, negative, 1)], Stage.BASE, "cpu", True)
    assert not torch.equal(plain.tensors["prompt_embeds"], c.tensors["prompt_embeds"])


def test_compel_on_the_refiner_uses_text_encoder_2(refiner: Any) -> None:
    prompt = "a (red cat)1.3 on a mat"
    c = encode(refiner, [Sample(prompt, "blurry", 1, weighting=W.COMPEL)], Stage.REFINER, "cpu", True)
    compel = Compel(
        tokenizer=refiner.tokenizer_2, text_encoder=refiner.text_encoder_2, truncate_long_prompts=False,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED, requires_pooled=True,
    )  # fmt: skip
    embeds, pooled = compel([prompt, "blurry"])
    assert torch.equal(c.tensors["prompt_embeds"], embeds[0:1])
    assert torch.equal(c.tensors["negative_prompt_embeds"], embeds[1:2])
    assert torch.equal(c.tensors["pooled_prompt_embeds"], pooled[0:1])


@pytest.mark.parametrize(
    ("a1111", "compel"),
    [
        ("a (cat:1.3) on a mat", "a (cat)1.3 on a mat"),
        ("a ((cat)) on a [mat]", "a (cat)1.2100000000000002 on a (mat)0.9090909090909091"),
        (LONG + ", (dog:1.4)", LONG + ", (dog)1.4"),
    ],
)
def test_a1111_weights_as_compel_does(base: Any, a1111: str, compel: str) -> None:
    a = encode(base, [Sample(a1111, "blurry", 1, weighting=W.A1111)], Stage.BASE, "cpu", True).tensors
    c = encode(base, [Sample(compel, "blurry", 1, weighting=W.COMPEL)], Stage.BASE, "cpu", True).tensors
    assert torch.equal(a["prompt_embeds"], c["prompt_embeds"])
    assert torch.equal(a["negative_prompt_embeds"], c["negative_prompt_embeds"])
    # The pooled embedding: the parsed text's first window (AUTOMATIC1111's), not the raw text (compel's)
    stripped = a1111.replace("(cat:1.3)", "cat").replace("((cat))", "cat").replace("[mat]", "mat")
    stripped = stripped.replace("(dog:1.4)", "dog")
    _, pooled = _window(base, "text_encoder_2", _ids(base, stripped)[:75])
    assert torch.equal(a["pooled_prompt_embeds"], pooled)
    if a1111 != LONG + ", (dog:1.4)":  # syntax in the first window: the two pooled texts differ
        assert not torch.equal(a["pooled_prompt_embeds"], c["pooled_prompt_embeds"])


def test_without_syntax_the_weightings_agree(base: Any) -> None:
    """compel's windows and padding are the plain path's (strict windows of 75, empty windows after)."""
    sample = {w: Sample(LONG, "blurry, low quality", 1, weighting=w) for w in W}
    plain = encode(base, [sample[W.NONE]], Stage.BASE, "cpu", True).tensors
    for weighting in (W.COMPEL, W.A1111):
        weighted = encode(base, [sample[weighting]], Stage.BASE, "cpu", True).tensors
        for name in NAMES:
            assert torch.allclose(weighted[name], plain[name], atol=1e-6), (weighting, name)


@pytest.mark.parametrize("weighting", list(W))
@pytest.mark.parametrize("which", ["base", "refiner"])
def test_reported_tokens_are_the_edges(weighting: W, which: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(which)
    positive = {W.NONE: LONG + " wow!!", W.COMPEL: LONG + ", (dog)1.2 wow!!", W.A1111: LONG + ", (dog:1.2) wow!!"}
    samples = [
        Sample(positive[weighting], "blurry!", 1, weighting=weighting),
        Sample(LONG, None, 2, weighting=weighting),
    ]
    c = encode(pipe, samples, _stage(pipe), "cpu", True)
    assert len(c.tokens) == 2
    for sample, tokens in zip(samples, c.tokens, strict=True):
        edge_p = tokenizer_counts(sample.prompt, weighting)
        edge_n = tokenizer_counts(sample.negative_prompt, weighting) if sample.negative_prompt else (0, 0)
        names = ["text_encoder", "text_encoder_2"] if which == "base" else ["text_encoder_2"]
        assert [t.encoder for t in tokens] == names
        for t in tokens:
            i = names.index(t.encoder) if which == "base" else 1
            assert (t.positive, t.negative) == (edge_p[i], edge_n[i])
            assert t.chunks == chunks_for(count_tokens(samples[0].prompt, weighting), 0) == 4
            assert t.stage is _stage(pipe)


def test_a_batch_shares_one_window_count(base: Any) -> None:
    with pytest.raises(AssertionError, match="windows"):
        encode(base, [Sample(LONG, None, 1), Sample("a cat", None, 2)], Stage.BASE, "cpu", True)
    with pytest.raises(AssertionError, match="windows"):
        encode(base, [Sample(LONG, None, 1)], Stage.BASE, "cpu", True, chunks=3)
    assert encode(base, [Sample(LONG, None, 1)], Stage.BASE, "cpu", True, chunks=4).tokens[0][0].chunks == 4


def test_malformed_syntax_is_refused_before_encoding(base: Any) -> None:
    with pytest.raises(PromptSyntaxError):
        encode(base, [Sample('("a", "b").blend(1)', None, 1, weighting=W.COMPEL)], Stage.BASE, "cpu", True)
