"""Byte sizes: what people read, and what operators may write."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelstore import StoreSettings
from modelstore.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (1500, "1.5 kB"),
        (12_345_678, "12.3 MB"),
        (6_938_000_000, "6.9 GB"),
        (2_000_000_000_000, "2000.0 GB"),
    ],
)
def test_sizes_read_in_si_decimal_units(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("1000000", 1_000_000),
        ("0", 0),
        ("512MB", 512_000_000),
        ("1.5 GB", 1_500_000_000),
        ("20GiB", 20 * 2**30),
        ("1 kB", 1000),
        ("1KB", 1000),
        ("3 KiB", 3 * 1024),
        ("2 MiB", 2 * 2**20),
        ("1 TB", 10**12),
        ("1TiB", 2**40),
        ("7 B", 7),
        (" 64 gb ", 64 * 10**9),
        (".5 kB", 500),
    ],
)
def test_sizes_parse_with_or_without_units(text: str, n: int) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("abc", "has no number"),
        ("", "has no number"),
        ("GiB", "has no number"),
        ("-1", "negative"),
        ("-5 GB", "negative"),
        ("12 parsecs", "unknown unit 'parsecs'"),
        ("1e9", "is not a size"),
        ("1.2.3 GB", "is not a size"),
    ],
)
def test_anything_else_is_a_clear_one_line_error(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as caught:
        parse_bytes(text)
    assert "\n" not in str(caught.value) and repr(text) in str(caught.value)


def test_every_size_format_bytes_writes_parses_back_within_its_rounding() -> None:
    for n in (512, 1500, 12_345_678, 6_938_000_000):
        assert abs(parse_bytes(format_bytes(n)) - n) <= n * 0.05


def test_the_cache_quota_takes_units_and_refuses_garbage(tmp_path: Path) -> None:
    env = {"REFINERY_CACHE_DIR": str(tmp_path)}
    assert StoreSettings.from_env({**env, "REFINERY_CACHE_MAX_BYTES": "20GiB"}).max_bytes == 20 * 2**30
    assert StoreSettings.from_env({**env, "REFINERY_CACHE_MAX_BYTES": "1000000"}).max_bytes == 1_000_000
    assert StoreSettings.from_env({**env, "REFINERY_CACHE_MAX_BYTES": ""}).max_bytes == 0  # no quota
    for bad in ("abc", "-1"):
        with pytest.raises(ValueError, match="REFINERY_CACHE_MAX_BYTES") as caught:
            StoreSettings.from_env({**env, "REFINERY_CACHE_MAX_BYTES": bad})
        assert "\n" not in str(caught.value)


def test_offline_mode_reads_yes_and_no_words_and_refuses_others(tmp_path: Path) -> None:
    env = {"REFINERY_CACHE_DIR": str(tmp_path)}
    for on in ("1", "true", "yes", "on", "ON", " True "):
        assert StoreSettings.from_env({**env, "REFINERY_OFFLINE": on}).offline, on
    for off in ("", "0", "false", "no", "off", "Off", "NO"):
        assert not StoreSettings.from_env({**env, "REFINERY_OFFLINE": off}).offline, off
    assert not StoreSettings.from_env(env).offline
    for bad in ("maybe", "2", "of\nf"):
        with pytest.raises(ValueError, match="REFINERY_OFFLINE") as caught:
            StoreSettings.from_env({**env, "REFINERY_OFFLINE": bad})
        assert "\n" not in str(caught.value)
