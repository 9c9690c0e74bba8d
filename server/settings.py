"""The server's one settings object, built in `server/cli.py` from flags and the environment and passed down.
Nothing else reads the environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from modelstore import StoreSettings

DEFAULT_BASE = "builtin:tiny-sdxl-base@1"
DEFAULT_REFINER = "builtin:tiny-sdxl-refiner@1"


@dataclass(frozen=True)
class Limits:
    """What a request may ask for. Bounds keep one request from monopolising a device or the wire."""

    min_side: int = 64
    max_side: int = 2048
    max_steps: int = 150
    default_steps: int = 30
    default_cfg_scale: float = 7.0
    max_cfg_scale: float = 30.0
    max_results: int = 8
    max_prompt_chars: int = 4000
    max_request_id_chars: int = 128
    max_priority: int = 100


@dataclass(frozen=True)
class Settings:
    store: StoreSettings
    host: str = "0.0.0.0"
    port: int = 50051
    # "auto": the first CUDA device if there is one, else the CPU.
    device: str = "auto"
    # Used when a request leaves `model` (or `refiner.model`) empty.
    default_model: str = DEFAULT_BASE
    default_refiner: str | None = DEFAULT_REFINER
    # Loaded at start-up; health turns SERVING once they are resident.
    preload: tuple[str, ...] = (DEFAULT_BASE, DEFAULT_REFINER)
    limits: Limits = field(default_factory=Limits)
    # On SIGTERM/SIGINT: stop accepting, let running requests finish for this long, then cancel them.
    grace_period_s: float = 30.0
    # Images of several MB travel in one message; gRPC's default 4 MiB receive limit is too small.
    max_message_bytes: int = 64 * 1024 * 1024
    log_json: bool = False
