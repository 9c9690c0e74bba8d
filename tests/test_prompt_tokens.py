"""Token counts at the edge: exactly what the pipelines' tokenizers read, after the weighting syntax is removed."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from server.core.domain import MAX_CHUNKS, PromptWeighting
from server.core.prompt_syntax import parse_a1111, parse_compel
from server.core.prompt_tokens import PromptSyntaxError, chunks_for, count_tokens, tokenizer_counts

CONFIGS = Path(__file__).resolve().parents[1] / "modelstore" / "configs" / "sdxl_base"
WORDS = [
    "a", "cat", "Photograph", "of", "an", "astronaut", "riding", "horse", "8k", "ultra-detailed", "don't", "it's",
    "wow!!", "!", "!!!", "hello!", "café", "Größe", "日本語", "🚀", "<|endoftext|>", "(", ")", "[", "]", ":1.3",
    ",", ".", ";", "   ", "\n", "\t", "x" * 40, "supercalifragilistic", "1024x1024", "#hashtag", "@user",
]  # fmt: skip


def _prompts(n: int) -> list[str]:
    rng = random.Random(17)
    fixed = ["", " ", "!", "a cat", "wow!! amazing!", "<|startoftext|>a", "MiXeD CaSe", "a,b;c.d", "é" * 90]
    return fixed + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def reference() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    return (
        CLIPTokenizer.from_pretrained(CONFIGS / "tokenizer"),
        CLIPTokenizer.from_pretrained(CONFIGS / "tokenizer_2"),
    )


def test_counts_equal_the_pipelines_tokenizers(reference: tuple[CLIPTokenizer, CLIPTokenizer]) -> None:
    for prompt in _prompts(300):
        expected = tuple(len(t(prompt, add_special_tokens=False, verbose=False).input_ids) for t in reference)
        assert tokenizer_counts(prompt, PromptWeighting.NONE) == expected, prompt
        assert count_tokens(prompt, PromptWeighting.NONE) == max(expected)
    # The one difference between the two: tokenizer_2's pad token `!` is a token of its own everywhere.
    assert tokenizer_counts("wow!!", PromptWeighting.NONE) == (2, 3)


def test_weighting_syntax_is_not_counted() -> None:
    plain = count_tokens("a photo of a cat on a mat", PromptWeighting.NONE)
    assert count_tokens("a photo of a (cat:1.3) on a [mat]", PromptWeighting.A1111) == plain
    assert count_tokens("a photo of a (cat)1.3 on a mat--", PromptWeighting.COMPEL) == plain
    # ...but read as text without weighting
    assert count_tokens("a photo of a (cat:1.3) on a [mat]", PromptWeighting.NONE) > plain
    blend = '("a cat", "a photo of a cat on a mat").blend(0.5, 0.5)'
    assert count_tokens(blend, PromptWeighting.COMPEL) == plain  # a blend is as long as its longest prompt


def test_window_counts() -> None:
    assert chunks_for(0, 0) == 1
    assert chunks_for(75, 3) == 1
    assert chunks_for(10, 76) == 2
    long = "cat " * 300
    assert count_tokens(long, PromptWeighting.NONE) == 300
    assert chunks_for(count_tokens(long, PromptWeighting.NONE), 0) == 4
    too_long = "cat " * (MAX_CHUNKS * 75 + 1)
    assert chunks_for(count_tokens(too_long, PromptWeighting.A1111), 0) == MAX_CHUNKS + 1


@pytest.mark.parametrize(
    ("prompt", "fragments"),
    [
        ("a cat", (("a cat", 1.0),)),
        ("a (cat:1.3) dog", (("a ", 1.0), ("cat", 1.3), (" dog", 1.0))),
        ("(cat)", (("cat", 1.1),)),
        ("[cat]", (("cat", 1 / 1.1),)),
        ("((cat))", (("cat", 1.1 * 1.1),)),
        ("((cat:1.5))", (("cat", 1.5 * 1.1),)),
        ("(a [b] c)", (("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1))),
        ("( cat : 0.5 )", ((" cat ", 0.5),)),
        (r"\(cat\) \[x\] a\\b", (("(cat) [x] a\\b", 1.0),)),
        ("(unclosed", (("unclosed", 1.1),)),  # closed at the end, as AUTOMATIC1111 does
        ("[unclosed (both", (("unclosed ", 1 / 1.1), ("both", 1.1 / 1.1))),
        ("stray) and] close", (("stray) and] close", 1.0),)),
        ("a:1.3) b: c", (("a:1.3) b: c", 1.0),)),  # a weight with no open group is text
        ("(cat:-1)", (("cat", -1.0),)),
        ("", (("", 1.0),)),
        ("a BREAK b", (("a BREAK b", 1.0),)),
    ],
)
def test_a1111_parse(prompt: str, fragments: tuple[tuple[str, float], ...]) -> None:
    parsed = parse_a1111(prompt)
    assert [t for t, _ in parsed] == [t for t, _ in fragments]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in fragments])


def test_compel_parse_is_compels() -> None:
    assert parse_compel("a (red cat)1.3 dog") == ((("a", 1.0), ("red cat", 1.3), ("dog", 1.0)),)
    assert parse_compel('("a cat", "a dog").blend(0.3, 0.7)') == ((("a cat", 1.0),), (("a dog", 1.0),))


@pytest.mark.parametrize(
    ("prompt", "weighting", "says"),
    [
        ('("a cat", "a dog").blend(0.3)', PromptWeighting.COMPEL, "compel syntax"),
        ('("a cat", "a dog").blend(x, y)', PromptWeighting.COMPEL, "compel syntax"),
        ('("a cat", "a dog").and()', PromptWeighting.COMPEL, ".and()"),
        ("a cat.swap(dog)", PromptWeighting.COMPEL, ".swap()"),
        ("withLora(detail, 0.5) a cat", PromptWeighting.COMPEL, "withLora"),
        ("a (cat:1.2.3)", PromptWeighting.A1111, "'1.2.3'"),
    ],
)
def test_malformed_syntax_is_refused(prompt: str, weighting: PromptWeighting, says: str) -> None:
    with pytest.raises(PromptSyntaxError, match=says.replace("(", r"\(").replace(")", r"\)")):
        count_tokens(prompt, weighting)
    assert count_tokens(prompt, PromptWeighting.NONE) > 0  # plain text reads anything


def test_counting_loads_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "from server.core.domain import PromptWeighting as W\n"
        "from server.core.prompt_tokens import count_tokens\n"
        "for w in W: count_tokens('a (cat)1.2 (dog:1.1)', w)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'compel', 'diffusers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
