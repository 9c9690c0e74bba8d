"""Byte counts for people: one formatter (SI decimal units) for the CLI and the logs, and one parser."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([a-z]*)")


def format_bytes(n: int) -> str:
    """1_500_000 -> "1.5 MB" (SI units, as disks and networks count)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """ "20GiB", "512MB", "1.5 GB", "1000000" -> bytes. Raises ValueError saying what is wrong."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"size {text!r}: use a number of bytes, or one with B, kB, MB, GB, TB, KiB, MiB, GiB or TiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])
