"""The model store's settings. Built once by the caller (the server's CLI) from flags and the environment;
nothing in this package reads the environment on its own."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelstore.downloads import DEFAULT_MIN_FREE_BYTES, NO_DOWNLOADS, OnDemandPolicy
from modelstore.units import parse_bytes

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class StoreSettings:
    cache_dir: Path
    # 0 = no quota.
    max_bytes: int = 0
    civitai_api: str = "https://civitai.com"
    civitai_token: str | None = None
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str | None = None
    # Refuse every download (the cache and local files still work).
    offline: bool = False
    # What a server's requests may download on demand (`modelstore.downloads`): none by default, so only an
    # operator decides what fills the disk; pulls and pins are never limited by it.
    on_demand: OnDemandPolicy = NO_DOWNLOADS
    # Free space a download for a request leaves on the cache's disk (0: none).
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    # The cache is a shared volume filled elsewhere and mounted read-only (`modelstore._read_only`): nothing
    # in it is written, and a model missing from it is refused (ReadOnlyCache), never fetched.
    read_only: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> StoreSettings:
        """REFINERY_CACHE_DIR, REFINERY_CACHE_MAX_BYTES, REFINERY_CIVITAI_API, CIVITAI_TOKEN, HF_ENDPOINT,
        HF_TOKEN, REFINERY_OFFLINE, REFINERY_DOWNLOAD_ON_DEMAND (none, any or AIR patterns),
        REFINERY_CACHE_MIN_FREE (a size), REFINERY_CACHE_READ_ONLY (on/off); keyword overrides (from CLI flags) win.

        REFINERY_CACHE_MAX_BYTES is a size with an optional unit ("20GiB", "512MB", "1000000"; empty or 0:
        no quota); REFINERY_OFFLINE and REFINERY_CACHE_READ_ONLY are 1/true/yes/on or 0/false/no/off (any
        case; empty: off). Anything else in any of them raises ValueError with a one-line message naming the
        variable."""
        env = os.environ if env is None else env
        default_cache = Path(env.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "refinery"
        values: dict[str, object] = {
            "cache_dir": Path(env.get("REFINERY_CACHE_DIR", str(default_cache))).expanduser(),
            "max_bytes": _size(env, "REFINERY_CACHE_MAX_BYTES"),
            "civitai_api": env.get("REFINERY_CIVITAI_API", "https://civitai.com").rstrip("/"),
            "civitai_token": env.get("CIVITAI_TOKEN") or None,
            "hf_endpoint": env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
            "hf_token": env.get("HF_TOKEN") or None,
            "offline": _flag(env, "REFINERY_OFFLINE"),
            "on_demand": _policy(env, "REFINERY_DOWNLOAD_ON_DEMAND"),
            "read_only": _flag(env, "REFINERY_CACHE_READ_ONLY"),
        }
        if env.get("REFINERY_CACHE_MIN_FREE", "").strip():
            values["min_free_bytes"] = _size(env, "REFINERY_CACHE_MIN_FREE")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        # Tokens never reach logs, not even through a settings dump.
        hidden = {"civitai_token", "hf_token"}
        fields = ", ".join(
            f"{name}={'<redacted>' if name in hidden and value else repr(value)}"
            for name, value in self.__dict__.items()
        )
        return f"StoreSettings({fields})"


def _size(env: Mapping[str, str], name: str) -> int:
    text = env.get(name, "")
    if not text.strip():
        return 0
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _policy(env: Mapping[str, str], name: str) -> OnDemandPolicy:
    try:
        return OnDemandPolicy.parse(env.get(name, ""))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _flag(env: Mapping[str, str], name: str) -> bool:
    text = env.get(name, "")
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{name}: {text!r} is neither on nor off: expected {'/'.join(_TRUE)} or {'/'.join(_FALSE[1:])}")
