"""Text conditioning of any length, plain or weighted, per sample of a batch.

A prompt is read in windows of 75 tokens, each encoded as [BOS] + window + [EOS], padded to 77 with the
tokenizer's own pad token, and the windows' embeddings are joined along the sequence (77 x k). How:

- Plain prompts that fit one window go through the pipeline's own `encode_prompt`, so their images are what
  they always were. Longer ones are cut into consecutive windows of exactly 75 tokens: strictly, with no
  backtracking (AUTOMATIC1111 moves a cut back to the last comma within 20 tokens, ComfyUI keeps words whole).
  Each window goes through each encoder alone; like SDXL's `encode_prompt`, the embedding is the penultimate
  hidden state, and the pooled embedding is text_encoder_2's projection of the first window (as AUTOMATIC1111
  and ComfyUI do).
- Weighted prompts are encoded by compel, with its SDXL settings (penultimate hidden states, not normalized;
  no truncation). compel's SDXL wrapper backtracks long prompts to a sentence end; it is given
  `SplitLongTextMode.BRUTAL` here so that every weighting cuts windows the same strict way and the edge's one
  count (`server/core/prompt_tokens.py`) holds for all three. For compel's syntax, the pooled embedding is
  compel's own: text_encoder_2's projection of the raw prompt text, truncated to one window. For
  AUTOMATIC1111's syntax, the syntax is parsed here (`server/core/prompt_syntax.py`), compel weights the
  fragments, and the pooled embedding is that of the first window of the parsed text, as in AUTOMATIC1111.

Every encoder, positive and negative, gets the same number of windows, the one the edge computed
(`chunks_for`): shorter sequences are padded with empty windows ([BOS][EOS] + padding, encoded), as compel's
`pad_conditioning_tensors_to_same_length` does. The SDXL base's `force_zeros_for_empty_prompt` (no negative
prompt) still gives zeros, of the padded shape. With no classifier-free guidance there is no negative side.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from compel import Compel, ReturnedEmbeddingsType, SplitLongTextMode  # type: ignore[import-untyped]

from server.core.domain import CHUNK_TOKENS, WINDOW_TOKENS, Prompt, PromptWeighting, Sample, Stage, TokenCount
from server.core.prompt_syntax import weighted_fragments
from server.core.prompt_tokens import chunks_for, count_tokens

WINDOW = WINDOW_TOKENS
_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass(frozen=True)
class Conditioning:
    """A batch's text conditioning: `tensors` as the SDXL pipelines take them (the negative ones absent without
    classifier-free guidance), and per sample what each of the stage's encoders read."""

    tensors: dict[str, torch.Tensor]
    tokens: tuple[tuple[TokenCount, ...], ...]


@dataclass(frozen=True)
class _Encoder:
    name: str  # "text_encoder" or "text_encoder_2"
    tokenizer: Any
    model: Any
    pooled: bool  # text_encoder_2, whose projection is SDXL's pooled embedding


@dataclass(frozen=True)
class _Side:
    embeds: torch.Tensor  # (1, 77 x chunks, the encoders' widths joined)
    pooled: torch.Tensor


def encode(
    pipe: Any, samples: Sequence[Sample], stage: Stage, device: Any, use_cfg: bool, *, chunks: int | None = None
) -> Conditioning:
    """Each sample's conditioning for `stage`, encoded alone (SDXL base zeroes the negative conditioning only
    for a sample without a negative prompt, which one list could not express), then stacked. `chunks`, when
    given, is the batch's window count from its render shape; every sample must need exactly that many."""
    encoders = _encoders(pipe)
    parts: list[tuple[torch.Tensor | None, ...]] = []
    tokens: list[tuple[TokenCount, ...]] = []
    with torch.no_grad():
        for sample in samples:
            prompt = sample.conditioning(stage)
            windows = _windows(prompt, sample.weighting)
            assert chunks is None or windows == chunks, f"a sample needs {windows} windows, the batch has {chunks}"
            chunks = windows  # a batch has one sequence length: every sample must need as many
            part = _encode_sample(pipe, encoders, prompt, sample.weighting, windows, device, use_cfg)
            assert part[0] is not None and part[0].shape[1] == WINDOW * windows, "windows and tensors disagree"
            parts.append(part)
            tokens.append(_token_counts(stage, encoders, prompt, sample.weighting, windows))
    stacked: dict[str, torch.Tensor] = {}
    for i, name in enumerate(_NAMES):
        tensors = [p[i] for p in parts]
        if tensors[0] is not None:
            stacked[name] = torch.cat([t for t in tensors if t is not None])
    return Conditioning(stacked, tuple(tokens))


def _windows(prompt: Prompt, weighting: PromptWeighting) -> int:
    """The edge's window count for this prompt pair (the request was admitted with it)."""
    negative = count_tokens(prompt.negative, weighting) if prompt.negative is not None else 0
    return chunks_for(count_tokens(prompt.positive, weighting), negative)


def _encoders(pipe: Any) -> list[_Encoder]:
    found = [
        _Encoder("text_encoder", pipe.tokenizer, pipe.text_encoder, pooled=False),
        _Encoder("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2, pooled=True),
    ]
    return [e for e in found if e.model is not None]  # the refiner has only text_encoder_2


def _encode_sample(
    pipe: Any,
    encoders: list[_Encoder],
    prompt: Prompt,
    weighting: PromptWeighting,
    chunks: int,
    device: Any,
    use_cfg: bool,
) -> tuple[torch.Tensor | None, ...]:
    if weighting is PromptWeighting.NONE and chunks == 1:
        return tuple(
            pipe.encode_prompt(
                prompt=prompt.positive,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=use_cfg,
                negative_prompt=prompt.negative,
            )
        )
    side = _side_encoder(encoders, weighting, chunks)
    positive = side(prompt.positive)
    negative: _Side | None = None
    if use_cfg and prompt.negative is None and pipe.config.force_zeros_for_empty_prompt:
        negative = _Side(torch.zeros_like(positive.embeds), torch.zeros_like(positive.pooled))
    elif use_cfg:
        negative = side(prompt.negative or "")
    # As encode_prompt: in text_encoder_2's dtype (the UNet's without it), on the execution device.
    dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.unet.dtype

    def out(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype=dtype, device=device)

    return (
        out(positive.embeds),
        out(negative.embeds if negative else None),
        out(positive.pooled),
        out(negative.pooled if negative else None),
    )


def _side_encoder(encoders: list[_Encoder], weighting: PromptWeighting, chunks: int) -> Any:
    """A function from one prompt text to its `_Side`, for the weighting."""
    if weighting is PromptWeighting.NONE:
        return lambda text: _plain(encoders, text, chunks)
    compels = [_compel(e) for e in encoders]
    if weighting is PromptWeighting.COMPEL:
        return lambda text: _compel_side(encoders, compels, text, chunks)
    return lambda text: _a1111_side(encoders, compels, text, chunks)


# ---- plain ---------------------------------------------------------------------------------------------------


def _plain(encoders: list[_Encoder], text: str, chunks: int) -> _Side:
    embeds, pooled = [], None
    for encoder in encoders:
        ids = encoder.tokenizer(text, add_special_tokens=False, truncation=False).input_ids
        windows = [ids[i : i + CHUNK_TOKENS] for i in range(0, max(len(ids), 1), CHUNK_TOKENS)]
        assert len(windows) <= chunks, f"{encoder.name} read {len(ids)} tokens, more than {chunks} windows"
        windows += [[]] * (chunks - len(windows))  # padded with empty windows
        hidden = []
        for i, window in enumerate(windows):
            states, projected = _encode_window(encoder, window_ids(encoder.tokenizer, window))
            hidden.append(states)
            if encoder.pooled and i == 0:
                pooled = projected
        embeds.append(torch.cat(hidden, dim=1))
    assert pooled is not None, "no text_encoder_2"
    return _Side(torch.cat(embeds, dim=-1), pooled)


def window_ids(tokenizer: Any, window: list[int]) -> list[int]:
    """[BOS] + up to 75 token ids + [EOS], padded to 77 with the tokenizer's own pad token."""
    ids = [tokenizer.bos_token_id, *window, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (WINDOW - len(ids))


def _encode_window(encoder: _Encoder, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One window through one encoder: (penultimate hidden state, first output), as SDXL's encode_prompt takes
    them; the first output is the pooled projection for text_encoder_2."""
    from diffusers.utils.torch_utils import get_module_execution_device

    device = get_module_execution_device(encoder.model)
    output = encoder.model(torch.tensor([ids], device=device), output_hidden_states=True)
    return output.hidden_states[-2], output[0]


# ---- weighted (compel) ---------------------------------------------------------------------------------------


def _compel(encoder: _Encoder) -> Compel:
    """compel for one encoder with CompelForSDXL's settings, but strict windows (see the module docstring)."""
    return Compel(
        tokenizer=encoder.tokenizer,
        text_encoder=encoder.model,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        truncate_long_prompts=False,
        requires_pooled=encoder.pooled,
        split_long_text_mode=SplitLongTextMode.BRUTAL,
    )


def _compel_side(encoders: list[_Encoder], compels: list[Compel], text: str, chunks: int) -> _Side:
    conjunction = _conjunction(text)
    embeds, pooled = [], None
    for encoder, compel in zip(encoders, compels, strict=True):
        z, _ = compel.build_conditioning_tensor_for_conjunction(conjunction)
        embeds.append(_padded(z, chunks, compel))
        if encoder.pooled:
            pooled = compel.conditioning_provider.get_pooled_embeddings([text], device=compel.device)
    assert pooled is not None, "no text_encoder_2"
    return _Side(torch.cat(embeds, dim=-1), pooled)


# compel's parser takes about 0.25 ms a character: one reading per text serves both encoders, both stages.
@functools.lru_cache(maxsize=64)
def _conjunction(text: str) -> Any:
    return Compel.parse_prompt_string(text)


def _a1111_side(encoders: list[_Encoder], compels: list[Compel], text: str, chunks: int) -> _Side:
    (fragments,) = weighted_fragments(text, PromptWeighting.A1111)
    texts, weights = [t for t, _ in fragments], [w for _, w in fragments]
    embeds, pooled = [], None
    for encoder, compel in zip(encoders, compels, strict=True):
        provider = compel.conditioning_provider
        z, ids = provider.get_embeddings_for_weighted_prompt_fragments(
            text_batch=[texts], fragment_weights_batch=[weights], should_return_tokens=True, device=compel.device
        )
        embeds.append(_padded(z, chunks, compel))
        if encoder.pooled:  # the first window of the parsed text, unweighted
            pooled = _encode_window(encoder, ids[0, :WINDOW].tolist())[1]
    assert pooled is not None, "no text_encoder_2"
    return _Side(torch.cat(embeds, dim=-1), pooled)


def _padded(z: torch.Tensor, chunks: int, compel: Compel) -> torch.Tensor:
    """`z` with compel's empty-prompt window appended up to `chunks` windows."""
    have = z.shape[1] // WINDOW
    assert z.shape[1] % WINDOW == 0 and have <= chunks, f"compel made {z.shape[1]} tokens for {chunks} windows"
    if have == chunks:
        return z
    empty = compel.conditioning_provider.empty_z.to(device=z.device, dtype=z.dtype)
    return torch.cat([z, *[empty] * (chunks - have)], dim=1)


# ---- what each encoder read ----------------------------------------------------------------------------------


def _token_counts(
    stage: Stage, encoders: list[_Encoder], prompt: Prompt, weighting: PromptWeighting, chunks: int
) -> tuple[TokenCount, ...]:
    """Counted with the pipeline's own tokenizers, over the texts its encoders read."""

    def read(encoder: _Encoder, text: str | None) -> int:
        if text is None:
            return 0
        return max(
            sum(len(encoder.tokenizer(t, add_special_tokens=False).input_ids) for t, _ in fragments)
            for fragments in weighted_fragments(text, weighting)
        )

    return tuple(
        TokenCount(stage, e.name, read(e, prompt.positive), read(e, prompt.negative), chunks) for e in encoders
    )
