"""How many CLIP tokens a prompt takes, known at the edge before any work (a batch shares one sequence length,
so the window count decides which requests may share one).

Every model served reads prompts with the SDXL tokenizers that ship with the model store
(`modelstore/configs/sdxl_base/tokenizer` and `tokenizer_2`, the built-in tiny models included), so the counts
are exact. They are built here with the `tokenizers` library from the packaged vocab.json and merges.txt,
exactly as transformers' `CLIPTokenizer` builds them (tests/test_prompt_tokens.py compares the two over many
prompts): importing transformers costs about a second here, `tokenizers` a few milliseconds, and neither
imports torch.

Both folders hold the same vocabulary and merges, so one set of files builds both. They differ in one way that
changes counts: tokenizer_2's pad token is `!`, which transformers registers as a special token, so there every
`!` is a token of its own (`wow!!` is 2 tokens for tokenizer, 3 for tokenizer_2). A count is the longer of the
two, which is what the base's window count needs.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from server.core.domain import CHUNK_TOKENS, PromptWeighting
from server.core.prompt_syntax import PromptSyntaxError, weighted_fragments

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["PromptSyntaxError", "chunks_for", "count_tokens", "tokenizer_counts"]

_START, _END = "<|startoftext|>", "<|endoftext|>"


def count_tokens(text: str, weighting: PromptWeighting) -> int:
    """Tokens the text encoders read of `text` (start and end tokens not counted), after the weighting's syntax
    is removed: the longer of the two tokenizers' counts. Raises `PromptSyntaxError` for malformed syntax."""
    return max(tokenizer_counts(text, weighting))


def tokenizer_counts(text: str, weighting: PromptWeighting) -> tuple[int, int]:
    """`count_tokens` for each tokenizer: (tokenizer, tokenizer_2). Weighted fragments are tokenized one by one
    and their tokens joined, as compel does; a compel `.blend()` counts its longest prompt."""
    sequences = [[fragment_text for fragment_text, _ in fragments] for fragments in weighted_fragments(text, weighting)]
    tokenizer, tokenizer_2 = _tokenizers()
    first = _longest(tokenizer, sequences)
    # Without a `!` the two read the same tokens: half the cost for most prompts.
    second = _longest(tokenizer_2, sequences) if any("!" in t for texts in sequences for t in texts) else first
    return first, second


def _longest(tokenizer: Tokenizer, sequences: list[list[str]]) -> int:
    return max(
        sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)) for texts in sequences
    )


def chunks_for(positive_tokens: int, negative_tokens: int) -> int:
    """75-token windows a sample's conditioning takes: both sides get as many as the longer needs, at least one."""
    return max(1, math.ceil(max(positive_tokens, negative_tokens) / CHUNK_TOKENS))


_lock = threading.Lock()
_loaded: tuple[Tokenizer, Tokenizer] | None = None


def _tokenizers() -> tuple[Tokenizer, Tokenizer]:
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                folder = _tokenizer_folder()
                _loaded = (_clip_tokenizer(folder, pad="<|endoftext|>"), _clip_tokenizer(folder, pad="!"))
    return _loaded


def _tokenizer_folder() -> Path:
    spec = importlib.util.find_spec("modelstore")  # the folder alone: the store itself is not needed here
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "configs" / "sdxl_base" / "tokenizer"


def _clip_tokenizer(folder: Path, pad: str) -> Tokenizer:
    """transformers 5's CLIPTokenizer, built the same way (transformers/models/clip/tokenization_clip.py)."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    bpe = BPE.from_file(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=_END,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # transformers adds the special tokens (pad included) as added tokens, matched in the text before BPE.
    specials = dict.fromkeys([_START, _END, pad])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer
