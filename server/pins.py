"""Pinned pairs as operators write them: "BASE[+REFINER]"."""

from __future__ import annotations

from modelstore import parse_air
from server.residency import PairKey


def parse_pin(text: str) -> PairKey:
    """ "BASE[+REFINER]" -> a pair of canonical AIRs. A '+' starts the refiner only where what follows is an
    AIR or a path of its own: civitai's "+fileId" and Hugging Face's "+file" belong to the AIR before them."""
    parts = text.split("+")
    models: list[str] = [parts[0]]
    for part in parts[1:]:
        if ":" in part or part.startswith("/"):
            models.append(part)
        else:
            models[-1] += "+" + part
    if len(models) > 2:
        raise ValueError(f"{text!r}: a pin is BASE or BASE+REFINER")
    base = parse_air(models[0]).canonical
    refiner = parse_air(models[1]).canonical if len(models) == 2 else None
    return PairKey(base, refiner)
