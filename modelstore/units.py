"""Byte sizes for people: one formatter and one parser, so logs, errors, the CLI and settings agree.

Output is in SI decimal units (1 kB = 1000 B), as disks and download sites state sizes: "512 B", "1.5 kB",
"12.3 MB", "6.9 GB". Input also takes the binary units an operator may think in ("20GiB"), and plain byte
counts ("1000000").
"""

from __future__ import annotations

import re
from decimal import Decimal

# Largest first: the first unit the number reaches is the one shown.
_DISPLAY_UNITS = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))
# Accepted on input, by their lower-cased names ("kB" and "KB" alike).
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
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")
_EXPECTED = "expected a number of bytes with an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 20GiB"


def format_bytes(n: int) -> str:
    """`n` bytes for people, in SI decimal units with one decimal: "512 B", "1.5 kB", "12.3 MB", "6.9 GB"."""
    for unit, scale in _DISPLAY_UNITS:
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """The number of bytes `text` states: "20GiB", "512MB", "1.5 GB", "1000000" (a fraction of a byte is
    dropped). Raises ValueError, with a one-line message that quotes `text`, for anything else, a missing
    number or a negative size."""
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"{text!r} is negative; a size must be 0 or more")
    match = _SIZE.fullmatch(stripped)
    if match is None:
        missing = not any(c.isdigit() for c in stripped)
        problem = "has no number" if missing else "is not a size"
        raise ValueError(f"{text!r} {problem}: {_EXPECTED}")
    scale = _UNITS.get(match["unit"].lower())
    if scale is None:
        raise ValueError(f"{text!r} has an unknown unit {match['unit']!r}: {_EXPECTED}")
    return int(Decimal(match["number"]) * scale)
