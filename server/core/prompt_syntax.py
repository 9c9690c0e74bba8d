"""Weighted prompts read into fragments of text with weights, before any model is involved.

Two syntaxes, both turned into embeddings by compel (`server/generation/prompts.py`), so they differ only in
how they are written:

- compel's own (`(red cat)1.3`, `cat++`, `("a", "b").blend(0.7, 0.3)`), read by compel's parser. compel's
  package imports torch on import, but its parser module is pure Python (pyparsing): the edge loads that one
  file on its own, so validating a request never loads torch.
- AUTOMATIC1111's (`(cat:1.3)`, `(cat)` x1.1, `[cat]` /1.1), read by `parse_a1111` below.

The result is a tuple of fragment sequences: one per text the encoders read in full. It has one sequence,
except for a compel `.blend()`, which encodes each blended prompt and pads them to the longest.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from server.core.domain import PromptWeighting

Fragment = tuple[str, float]  # text, weight
Fragments = tuple[Fragment, ...]


class PromptSyntaxError(ValueError):
    """A prompt that its weighting's syntax cannot read; the message says what and where."""


def weighted_fragments(text: str, weighting: PromptWeighting) -> tuple[Fragments, ...]:
    """The fragment sequences the encoders read for `text` (see the module docstring)."""
    if weighting is PromptWeighting.COMPEL:
        return parse_compel(text)
    if weighting is PromptWeighting.A1111:
        return (parse_a1111(text),)
    return (((text, 1.0),),)


# ---- AUTOMATIC1111 -------------------------------------------------------------------------------------------

# The same reading as AUTOMATIC1111's `parse_prompt_attention` (modules/prompt_parser.py): an escaped bracket or
# backslash is literal; `(` and `[` open a group; `:<number>)` closes a round group with that weight, `)` with
# x1.1, `]` a square group with /1.1; a closer with no open group, and a lone `:` or `\`, are literal text.
_A1111_TOKEN = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<bracket>[()\[\]])
  | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    re.VERBOSE,
)
_ROUND = 1.1  # AUTOMATIC1111's factor for one pair of round brackets; square brackets divide by it


def parse_a1111(text: str) -> Fragments:
    """AUTOMATIC1111's attention syntax as fragments. Nesting multiplies (`((a))` is 1.21, `((a:1.5))` 1.65);
    groups still open at the end are closed there, as AUTOMATIC1111 does; adjacent fragments of equal weight are
    merged. `BREAK` has no meaning here: it is read as text. A weight that is not a number (`(a:1.2.3)`, on which
    AUTOMATIC1111 itself fails) raises `PromptSyntaxError`."""
    pieces: list[list[Any]] = []  # [text, weight], weights multiplied in place as groups close
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open group's pieces start

    def close(kind: str, factor: float) -> None:
        for piece in pieces[opened[kind].pop() :]:
            piece[1] *= factor

    for match in _A1111_TOKEN.finditer(text):
        token = match.group(0)
        if match.group("escaped"):
            pieces.append([token[1:], 1.0])
        elif match.group("weight") is not None:
            if not opened["("]:
                pieces.append([token, 1.0])
                continue
            try:
                weight = float(match.group("weight"))
            except ValueError:
                raise PromptSyntaxError(
                    f"weight {match.group('weight')!r} at {match.start()} is not a number"
                ) from None
            close("(", weight)
        elif token in "([":
            opened[token].append(len(pieces))
        elif token == ")" and opened["("]:
            close("(", _ROUND)
        elif token == "]" and opened["["]:
            close("[", 1 / _ROUND)
        else:
            pieces.append([token, 1.0])
    while opened["("]:
        close("(", _ROUND)
    while opened["["]:
        close("[", 1 / _ROUND)
    return _merged(pieces)


def _merged(pieces: list[list[Any]]) -> Fragments:
    merged: list[Fragment] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return tuple(merged) or (("", 1.0),)


# ---- compel --------------------------------------------------------------------------------------------------

_parser_lock = threading.Lock()
_parser: Any = None


def _compel_parser() -> tuple[ModuleType, Any]:
    """compel's prompt_parser.py loaded alone (its package `__init__` imports torch), and one parser from it."""
    global _parser
    with _parser_lock:
        if _parser is None:
            spec = importlib.util.find_spec("compel")  # finds the package without running its __init__
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError("compel is not installed")
            path = Path(next(iter(spec.submodule_search_locations))) / "prompt_parser.py"
            file_spec = importlib.util.spec_from_file_location("_refinery_compel_prompt_parser", path)
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            _parser = (module, module.PromptParser())
        return _parser  # type: ignore[no-any-return]


# compel's parser (pyparsing) takes about 0.25 ms per character; the edge and the generation of one request
# read the same prompt, so the reading is kept.
@functools.lru_cache(maxsize=256)
def parse_compel(text: str) -> tuple[Fragments, ...]:
    """compel's syntax as fragments, as compel itself reads it. Parts of compel that the SDXL pipelines cannot
    honour are refused rather than dropped: `.and()` of several prompts, `.swap()` (cross-attention control),
    and `withLora()` (LoRAs are the request's own field)."""
    module, parser = _compel_parser()
    import pyparsing

    try:
        with _parser_lock:  # one grammar object; pyparsing does not promise re-entrancy
            conjunction = parser.parse_conjunction(text)
    except (module.PromptParser.ParsingException, ValueError, pyparsing.ParseBaseException) as error:
        raise PromptSyntaxError(f"not valid compel syntax: {error}") from None
    if conjunction.lora_weights:
        raise PromptSyntaxError("withLora() is not supported: ask for LoRAs in the request's loras")
    if len(conjunction.prompts) != 1:
        raise PromptSyntaxError(".and() of several prompts is not supported")
    (prompt,) = conjunction.prompts
    flattened = prompt.prompts if isinstance(prompt, module.Blend) else [prompt]
    sequences = []
    for part in flattened:
        if any(not isinstance(child, module.Fragment) for child in part.children):
            raise PromptSyntaxError(".swap() (cross-attention control) is not supported")
        sequences.append(tuple((child.text, float(child.weight)) for child in part.children))
    return tuple(sequences)
