"""The server's one settings object, built by the CLI (`server/cli/serve.py`) from flags and the environment
and passed down. Nothing else reads the environment."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from modelstore import AIR, StoreSettings, parse_air
from server.core.domain import PairKey

DEFAULT_BASE = "builtin:tiny-sdxl-base@1"
DEFAULT_REFINER = "builtin:tiny-sdxl-refiner@1"
DEFAULT_PAIR = PairKey(parse_air(DEFAULT_BASE), parse_air(DEFAULT_REFINER))


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
    # Work one request may ask for: width x height x number_results x steps, in megapixel-steps (a 1024x1024
    # image of 30 steps is 31.5). None: the default of the devices' kind (`WORK_LIMITS`).
    max_work: float | None = None

    def work_limit(self, device_kinds: set[str]) -> float:
        """The limit for a server with devices of these kinds ("cuda", "cpu"): the most permissive one's."""
        if self.max_work is not None:
            return self.max_work
        return max(WORK_LIMITS.get(kind, WORK_LIMITS["cpu"]) for kind in device_kinds or {"cpu"})


# Default work limits per device kind, in megapixel-steps. On an H200 SDXL runs about 14 per second, so 600 is
# some 45 s of one GPU (2048x2048, 4 results, 30 steps fits; 8 results do not). On a CPU even the tiny models
# take tens of seconds at 256x256: 40 keeps one request to minutes.
WORK_LIMITS = {"cuda": 600.0, "cpu": 40.0}


@dataclass(frozen=True)
class Security:
    """Who may reach what (README "Security"). Tokens come from the environment or mounted files, never
    flags (a command line is visible to every user of the machine), and never reach a log."""

    # TLS for the gRPC port; with `tls_client_ca`, clients must present a certificate it signed (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # `authorization: Bearer <token>`: `token` for generation and status, `admin_token` for everything
    # (pull, verify, pin, unpin, delete, PinPair, UnpinPair). Without an admin token, administration is off...
    token: str | None = None
    admin_token: str | None = None
    # ...unless the operator trusts every loopback peer with it (`--trust-loopback-admin`). Off by default: a
    # proxy on the same host (nginx, a sidecar, `kubectl port-forward`) makes every remote caller a loopback peer.
    trust_loopback_admin: bool = False
    # Folders whose files remote requests may name as local models; none: no local models from requests.
    local_model_roots: tuple[Path, ...] = ()

    def __repr__(self) -> str:
        hidden = ("token", "admin_token")
        fields = ", ".join(
            f"{name}={'<redacted>' if name in hidden and value else repr(value)}"
            for name, value in self.__dict__.items()
        )
        return f"Security({fields})"


@dataclass(frozen=True)
class ImageSettings:
    """The image store (`server/images/`): input images uploaded or sent inline, and results kept on request.
    Files live on disk (the cache volume), never whole in RAM; README "Configuration" lists the flags."""

    # None: `images/` in the model cache (the cache volume).
    directory: Path | None = None
    # One image's file; more is refused from the upload's header, before any byte is stored.
    max_bytes: int = 32 * 1024 * 1024
    # One image's pixels (width x height, each side also at most `Limits.max_side`): the largest a request may
    # generate, so an input never asks for more than a result could be.
    max_pixels: int = 2048 * 2048
    # How long an image is kept when its upload does not say, and the most any upload or kept result may ask.
    default_keep_s: float = 3600.0
    max_keep_s: float = 24 * 3600.0
    # All stored images together; expired ones are swept first, then a new one that does not fit is refused.
    quota_bytes: int = 2 * 1024 * 1024 * 1024
    # The largest image a request may carry inline (ImageInput.data): the whole request is limited to 128 KiB.
    inline_bytes: int = 96 * 1024

    def directory_in(self, cache_dir: Path) -> Path:
        return self.directory if self.directory is not None else cache_dir / "images"


class Toggle(Enum):
    """A speed option: `AUTO` is on for CUDA devices unless compilation is off (`--compile off` is the switch
    back to the untuned path), `ON` and `OFF` hold everywhere, the CPU included."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


# torch.compile's modes (plus "off", and "auto": "default" on CUDA, off elsewhere). "reduce-overhead" and
# "max-autotune" add CUDA graphs.
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# How the VAE decodes: "upcast" in float32 as diffusers does for SDXL's fp16 VAE (`force_upcast`), or in
# bfloat16 (float32's exponent range, so no overflow, at half the bytes); "auto": bfloat16 where the device
# has it and tuning is on (see Toggle).
VAE_DECODES = ("auto", "upcast", "bfloat16")


@dataclass(frozen=True)
class Speed:
    """How pipelines are tuned where they are loaded onto a device (server/generation/tuning.py); the README's
    "Speed" section says what each costs and gains."""

    compile: str = "auto"
    fuse_qkv: Toggle = Toggle.AUTO
    channels_last: Toggle = Toggle.AUTO
    vae_decode: str = "auto"
    # The UNets' linear layers in FP8 (torchao); only on GPUs with FP8 (compute capability 8.9+).
    fp8: bool = False
    # Image sizes compiled per UNet besides those of pinned pairs; further sizes always run eagerly.
    compile_sizes: int = 4
    # torch.compile's caches (Inductor, Triton, Dynamo's artefacts); None: `compile/` in the model cache, so a
    # restarted server (or another replica sharing the volume) compiles nothing again.
    compile_cache_dir: Path | None = None
    # zlib level of PNG results (0-9): 1 is several times faster than Pillow's 6 and costs a few % in size
    # (benchmarks/bench_encode.py).
    png_level: int = 1


@dataclass(frozen=True)
class Settings:
    store: StoreSettings
    host: str = "0.0.0.0"
    port: int = 50051
    # One worker per device: "cuda:0", "cuda:1", "cpu"; "auto" is the first CUDA device if there is one, else
    # the CPU.
    devices: tuple[str, ...] = ("auto",)
    # Used when a request leaves `model` (or `refiner.model`) empty.
    default_model: AIR = DEFAULT_PAIR.base
    default_refiner: AIR | None = DEFAULT_PAIR.refiner
    # "BASE[+REFINER]" pairs loaded on every device at start-up and never evicted; health turns SERVING once
    # they are resident.
    pins: tuple[PairKey, ...] = (DEFAULT_PAIR,)
    # Requests waiting for a device; beyond this a request is refused at once (RESOURCE_EXHAUSTED + RetryInfo).
    max_queue: int = 64
    # Images denoised together (requests with the same pair and shape); 1 turns batching off. With continuous
    # batching, the most images in flight on a device at once.
    max_batch: int = 4
    # "continuous": requests join a running batch at the next step boundary and leave when done (README
    # "Batching"); "static": a batch is formed when a device is free and runs to its end.
    batching: str = "continuous"
    # Threads that encode finished images (PNG/JPEG/WebP) and send them while the device already denoises its
    # next batch: a 1024x1024 PNG takes about 0.17 s of CPU, 8 % of a request on an H200. 0 encodes on the
    # device worker's own thread (no overlap; for machines short of CPU cores).
    encode_threads: int = 2
    # Bytes of model weights per device. 0: the device's memory (RAM for the CPU) less `headroom_fraction`,
    # which is left for activations, the VAE decode and the allocator's slack.
    budget_bytes: int = 0
    headroom_fraction: float = 0.25
    # Serve Prometheus metrics on this port (0: off).
    metrics_port: int = 0
    # A plaintext port that answers only grpc.health.v1 (0: off): for probes that cannot speak TLS.
    health_port: int = 0
    limits: Limits = field(default_factory=Limits)
    # On SIGTERM/SIGINT: report NOT_SERVING but keep accepting calls for `drain_delay_s` (so a balancer
    # that polls health moves traffic away first), then stop accepting, let running requests finish for
    # `grace_period_s`, then cancel them.
    drain_delay_s: float = 5.0
    grace_period_s: float = 30.0
    # The largest message the server sends. A result larger than `image_chunk_bytes` is sent as a run of
    # chunks (proto: ImageChunk), so that clients with gRPC's default 4 MiB receive limit get every image.
    max_message_bytes: int = 64 * 1024 * 1024
    image_chunk_bytes: int = 3 * 1024 * 1024
    # Requests are small: anything larger is refused before it is read whole. The largest valid request is
    # about 73 KB (four prompts of 4000 four-byte characters, two 1024-character AIRs); a typical one, 1 KB.
    max_request_bytes: int = 128 * 1024
    security: Security = field(default_factory=Security)
    log_json: bool = False
    # OpenTelemetry traces: the exporter ("otlp", "console") that `server.core.tracing.tracing_exporter` read from
    # the standard OTEL_* environment; None: off (the default), and OpenTelemetry is never imported.
    tracing: str | None = None
    speed: Speed = field(default_factory=Speed)
    images: ImageSettings = field(default_factory=ImageSettings)
