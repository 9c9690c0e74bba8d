"""Flags that may also come from the environment, and the converters that check them.

Each such flag names its variable: a flag on the command line wins over the variable, which wins over the
default. A bad value, from either, is refused by argparse in one line with exit code 2 before anything starts
(`refinery serve: error: argument --max-batch: must be at least 1, got 0 (from REFINERY_MAX_BATCH)`).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from modelstore import AIR, parse_air
from modelstore.errors import InvalidModelId
from modelstore.units import parse_bytes
from refinery.client import Lora
from server.core.domain import PairKey
from server.core.settings import COMPILE_MODES, VAE_DECODES, Toggle

Convert = Callable[[str], Any]

EXIT_FAILED = 1
EXIT_USAGE = 2
# A LoRA's weight as the contract bounds it (generation.proto, Lora.weight).
LORA_WEIGHTS = (-4.0, 4.0)
# The image fields' ranges as the contract states them (generation.proto, GenerateRequest.mask_blur and
# mask_margin), checked here so that a typo is refused before a server starts in this process.
MASK_BLUR_MAX = 64
MASK_MARGIN_MAX = 512
_REFERENCE = re.compile(r"sha256:[0-9a-f]{64}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_SECONDS_PER = {"d": 86400, "h": 3600, "m": 60, "s": 1}


class UsageError(Exception):
    """A bad setting found after parsing; reported in one line with exit code 2."""


def env_flag(
    parser: argparse._ActionsContainer,
    env: Mapping[str, str],
    flag: str,
    *,
    var: str,
    convert: Convert,
    default: str | None,
    help: str,
    **kwargs: Any,
) -> None:
    """`flag`, defaulting to the environment variable `var`, then to `default`; both go through `convert`."""
    from_env = env.get(var)
    checked = argument_type(convert, f" (from {var})" if from_env is not None else "", from_env)
    parser.add_argument(
        flag, type=checked, default=from_env if from_env is not None else default, help=f"{help} [{var}]", **kwargs
    )


def argument_type(convert: Convert, where: str = "", from_env: str | None = None) -> Convert:
    """`convert` as an argparse type: its ValueError (or InvalidModelId) becomes argparse's one-line error with
    the converter's own message (argparse would print only "invalid VALUE"), and a traceback never; `where`
    follows the message when the text is `from_env`."""

    def checked(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, InvalidModelId) as exc:
            raise argparse.ArgumentTypeError(f"{exc}{where if text == from_env else ''}") from None

    checked.__name__ = convert.__name__  # argparse names the converter in some messages
    return checked


def secret(env: Mapping[str, str], var: str) -> str | None:
    """A token from `var`, or from the file `var`_FILE names (a mounted secret); surrounding whitespace is
    dropped; None when neither is set. UsageError, naming the variable and never the token, when the file cannot
    be read or the token is not one a client can send: empty or only whitespace (which would otherwise turn
    authentication off), or anything but visible ASCII (an HTTP/2 header value)."""
    path = env.get(f"{var}_FILE")
    if path:
        source = f"{var}_FILE {path}"
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UsageError(f"{source}: {exc.strerror or exc}") from None
    elif var in env:
        source, text = var, env[var]
    else:
        return None
    token = text.strip()
    if not token:
        raise UsageError(f"{source}: the token is empty; set a token or unset the variable")
    if not all(0x21 <= ord(char) <= 0x7E for char in token):
        raise UsageError(f"{source}: a token may hold only visible ASCII characters (no spaces or line breaks)")
    return token


# ---- converters: each raises ValueError with a message that reads after "argument --flag: " ------------------


def count(text: str) -> int:
    """A whole number >= 0."""
    if not text.strip().isdigit():
        raise ValueError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"a port is 0..65535, got {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def megapixel_steps(text: str) -> float | None:
    """A positive number of megapixel-steps; "" for the default of the devices' kind."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of megapixel-steps, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of megapixel-steps, got {text!r}")
    return value


def size(text: str) -> int:
    """Bytes: "40GiB", "512MB", "1000000"; 0 means unset."""
    return parse_bytes(text)


def flag_on(text: str) -> bool:
    return text.strip().lower() not in ("", "0", "false", "no", "off")


def air(text: str) -> AIR:
    return parse_air(text)


def optional_air(text: str) -> AIR | None:
    """An AIR, or "none" / "" for no model."""
    return None if text.strip().lower() in ("", "none") else air(text)


def lora(text: str) -> Lora:
    """AIR[:WEIGHT]. AIRs hold ':' themselves (civitai:122359@135867, urn:air:sdxl:lora:...), so the weight is
    what follows the last ':' only where that reads as a number: "civitai:122359@135867:0.8" is weight 0.8,
    "builtin:tiny-lora-base@1" weight unset (the server's 1). A number that is no weight is refused here rather
    than after a server has started in this process."""
    value = text.strip()
    model, sep, tail = value.rpartition(":")
    try:
        weight = float(tail) if sep else None  # without ':' a bare path, even one named like a number
    except ValueError:
        weight = None  # the ':' is the AIR's own
    model = model.strip() if weight is not None else value
    if not model or model.endswith(":"):
        raise ValueError(f"expected AIR or AIR:WEIGHT like civitai:122359@135867:0.8, got {text!r}")
    if weight is not None:
        low, high = LORA_WEIGHTS
        if not (math.isfinite(weight) and low <= weight <= high):
            raise ValueError(f"a LoRA's weight is a number in {low:g}..{high:g}, got {tail.strip()!r} in {text!r}")
    return Lora(model, weight)


def image_source(text: str) -> str:
    """A stored image's reference ("sha256:<64 hex>", from an upload or a kept result), or an image file that
    exists (read when the request is sent)."""
    value = text.strip()
    if _REFERENCE.fullmatch(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        reason = "is not a file" if path.exists() else "does not exist"
        raise ValueError(f"expected an image file or a reference sha256:<64 hex digits>; {text!r} {reason}")
    return str(path)


def strength(text: str) -> float:
    """How much of the schedule runs over the image: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"strength is a number in (0, 1] (above 0, at most 1), got {text!r}")
    return value


def mask_blur(text: str) -> int:
    return _whole_in(text, MASK_BLUR_MAX)


def mask_margin(text: str) -> int:
    return _whole_in(text, MASK_MARGIN_MAX)


def duration(text: str) -> timedelta:
    """A time span: seconds ("3600"), or numbers with units d, h, m, s ("90s", "30m", "1h30m")."""
    value = text.strip().replace(" ", "").lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or "".join(number + unit for number, unit in parts) != value:
            raise ValueError(f"expected a duration like 3600, 90s, 30m, 1h or 1h30m, got {text!r}") from None
        seconds = sum(float(number) * _SECONDS_PER[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration is finite and 0 or more, got {text!r}")
    return timedelta(seconds=seconds)


def _whole_in(text: str, most: int) -> int:
    value = _integer(text)
    if not 0 <= value <= most:
        raise ValueError(f"must be in 0..{most}, got {value}")
    return value


def devices(text: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in text.split(",") if d.strip()) or ("auto",)


def pins(text: str) -> tuple[PairKey, ...] | None:
    """Comma-separated "BASE[+REFINER]" pairs; "none" for no pins; "" for the default pair (None)."""
    texts = [p.strip() for p in text.split(",") if p.strip()]
    if not texts:
        return None
    if any(p.lower() == "none" for p in texts):
        return ()
    return tuple(PairKey.parse(p) for p in texts)


def compile_mode(text: str) -> str:
    return _one_of(text, COMPILE_MODES)


def vae_decode(text: str) -> str:
    return _one_of(text, VAE_DECODES)


def toggle(text: str) -> Toggle:
    return Toggle(_one_of(text, tuple(t.value for t in Toggle)))


def on_off(text: str) -> bool:
    return _one_of(text, ("on", "off")) == "on"


def png_level(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 9:
        raise ValueError(f"a zlib level is 0..9, got {value}")
    return value


BATCHING_MODES = ("continuous", "static")


def batching(text: str) -> str:
    return _one_of(text, BATCHING_MODES)


def _one_of(text: str, choices: tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}; got {text!r}")
    return value


def directory(text: str) -> Path:
    return Path(text).expanduser()


def local_root(text: str) -> Path:
    """A folder requests may name local models under: absolute (a relative one would depend on where the
    server was started) and an existing folder, or the setting is a mistake."""
    path = directory(text)
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path, got {text!r}")
    if not path.is_dir():
        raise ValueError(f"{text!r} is not a folder" if path.exists() else f"{text!r} does not exist")
    return path


def yes_no(text: str) -> bool:
    """yes/no, true/false, on/off, 1/0 (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def optional_directory(text: str) -> Path | None:
    """A folder, or "" for the default (None)."""
    return directory(text) if text.strip() else None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
