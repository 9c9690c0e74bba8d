"""`refinery serve`: run the gRPC server until SIGTERM or SIGINT, and the server settings every command builds.

The server's one settings object comes from here: flags, else REFINERY_* variables, else defaults, each checked
by argparse as it is read (`options.py`). `refinery generate` without `--server` builds the same settings for a
server inside the command (loopback, a free port, nothing pinned).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from modelstore import OnDemandPolicy, StoreSettings, folders_read
from modelstore.errors import ModelStoreError
from server.cli import options
from server.cli.options import EXIT_FAILED, UsageError, env_flag, secret
from server.cli.serve_images import add_image_flags, image_settings
from server.core.domain import PairKey
from server.core.logs import quiet_model_libraries
from server.core.settings import DEFAULT_BASE, DEFAULT_REFINER, Limits, Security, Settings, Speed
from server.core.tracing import tracing_exporter
from server.prefetch import start_prefetch


def add_device_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Flags of every command that may run a server in this process."""
    env_flag(
        parser,
        env,
        "--devices",
        var="REFINERY_DEVICES",
        convert=options.devices,
        default="auto",
        help="comma-separated: auto (default), cpu, cuda, cuda:N; one worker each",
    )
    parser.add_argument("--device", dest="devices", type=options.devices, help=argparse.SUPPRESS)


_BATCHING_HELP = "continuous: requests join a running batch at the next step (default); static: a batch runs to its end"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], env: Mapping[str, str]) -> None:
    serve = commands.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")

    def flag(name: str, var: str, convert: options.Convert, default: str | None, help: str) -> None:
        env_flag(serve, env, name, var=var, convert=convert, default=default, help=help)

    flag("--host", "REFINERY_HOST", str, "0.0.0.0", "address to bind (default 0.0.0.0)")
    flag("--port", "REFINERY_PORT", options.port, "50051", "port (default 50051; 0 = any free port)")
    flag("--model", "REFINERY_MODEL", options.air, DEFAULT_BASE, f"default base model (default {DEFAULT_BASE})")
    flag(
        "--refiner",
        "REFINERY_REFINER",
        options.optional_air,
        DEFAULT_REFINER,
        f"default refiner, or 'none' (default {DEFAULT_REFINER})",
    )
    serve.add_argument(
        "--pin",
        action="append",
        type=options.argument_type(options.pins),
        metavar="BASE[+REFINER]",
        help="keep this pair resident on every device from start-up (repeatable; 'none' for no pins; default: "
        "the default base+refiner); health is SERVING once pinned pairs are loaded",
    )
    flag("--pins", "REFINERY_PINS", options.pins, "", "the same as --pin, comma-separated")
    flag("--max-queue", "REFINERY_MAX_QUEUE", options.positive, "64", "requests that may wait (default 64)")
    flag("--max-batch", "REFINERY_MAX_BATCH", options.positive, "4", "images denoised together (default 4; 1 = off)")
    flag("--batching", "REFINERY_BATCHING", options.batching, "continuous", _BATCHING_HELP)
    flag(
        "--encode-threads",
        "REFINERY_ENCODE_THREADS",
        options.non_negative,
        "2",
        "threads encoding results while the device runs the next batch (default 2; 0 = on the device's worker)",
    )
    flag(
        "--budget",
        "REFINERY_BUDGET",
        options.size,
        "0",
        "model memory per device, e.g. 40GiB (default: the device's memory less 25%%)",
    )
    flag("--metrics-port", "REFINERY_METRICS_PORT", options.port, "0", "serve Prometheus /metrics here (default off)")
    flag("--grace", "REFINERY_GRACE_PERIOD", options.seconds, "30", "seconds running requests get on shutdown")
    flag(
        "--drain-delay",
        "REFINERY_DRAIN_DELAY",
        options.seconds,
        "5",
        "seconds of NOT_SERVING before the port closes on shutdown, for balancers (0 = close at once)",
    )
    flag("--health-port", "REFINERY_HEALTH_PORT", options.port, "0", "plaintext port with only grpc.health (probes)")
    flag("--max-work", "REFINERY_MAX_WORK", options.megapixel_steps, "", "megapixel-steps one request may ask for")
    add_security_flags(serve, env)
    add_speed_flags(serve, env)
    add_image_flags(serve, env)
    add_device_flags(serve, env)
    add_store_flags(serve)
    add_log_flags(serve, env)


def add_security_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """TLS files and local-model roots; tokens come only from the environment or files it names."""
    for name, var, what in (
        ("--tls-cert", "REFINERY_TLS_CERT", "TLS certificate chain (PEM) for the gRPC port"),
        ("--tls-key", "REFINERY_TLS_KEY", "its private key (PEM)"),
        ("--tls-client-ca", "REFINERY_TLS_CLIENT_CA", "require client certificates signed by this CA (mTLS)"),
    ):
        env_flag(parser, env, name, var=var, convert=options.directory, default=None, help=what)
    env_flag(
        parser,
        env,
        "--trust-loopback-admin",
        var="REFINERY_TRUST_LOOPBACK_ADMIN",
        convert=options.yes_no,
        default="no",
        nargs="?",
        const=True,
        help="without an admin token, let any caller on this machine's loopback administer (default: no; never "
        "behind a proxy on this host, which makes every caller loopback)",
    )
    parser.add_argument(
        "--local-models",
        action="append",
        type=options.argument_type(options.local_root),
        metavar="DIR",
        help="a folder whose files requests may name as local models (repeatable; default: none) "
        f"[REFINERY_LOCAL_MODELS, separated by {os.pathsep!r}]",
    )


def add_speed_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The speed options (server/generation/tuning.py; README "Speed"). "auto": on for CUDA devices unless
    --compile is off; --compile off is the untuned path exactly."""
    group = parser.add_argument_group("speed")

    def flag(name: str, var: str, convert: options.Convert, default: str, help: str) -> None:
        env_flag(group, env, name, var=var, convert=convert, default=default, help=help)

    flag(
        "--compile",
        "REFINERY_COMPILE",
        options.compile_mode,
        "auto",
        "torch.compile the UNets: auto (default: "
        "'default' on CUDA, off elsewhere), off, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs",
    )
    flag(
        "--fuse-qkv",
        "REFINERY_FUSE_QKV",
        options.toggle,
        "auto",
        "fused QKV projections: auto (off), on (LoRAs are then refused), off",
    )
    flag("--channels-last", "REFINERY_CHANNELS_LAST", options.toggle, "auto", "channels-last UNets: auto, on, off")
    flag(
        "--vae-decode",
        "REFINERY_VAE_DECODE",
        options.vae_decode,
        "auto",
        "VAE decode: auto (bfloat16 where tuned), upcast (float32, as diffusers), bfloat16",
    )
    flag("--fp8", "REFINERY_FP8", options.on_off, "off", "FP8 UNet linear layers (GPUs with FP8; needs torchao)")
    flag(
        "--compile-sizes",
        "REFINERY_COMPILE_SIZES",
        options.non_negative,
        "4",
        "image sizes compiled per UNet on demand besides the pinned pairs' (default 4)",
    )
    flag(
        "--compile-cache",
        "REFINERY_COMPILE_CACHE",
        options.optional_directory,
        "",
        "torch.compile's caches (default: compile/ in the model cache)",
    )
    flag("--png-level", "REFINERY_PNG_LEVEL", options.png_level, "1", "PNG zlib level 0-9 (default 1)")


def speed_settings(args: argparse.Namespace, store: StoreSettings) -> Speed:
    compile_cache = args.compile_cache
    if compile_cache is None and store.read_only:
        # Its default, compile/ in the model cache, cannot be written: a per-pod scratch folder (an emptyDir).
        compile_cache = Path(tempfile.gettempdir()) / "refinery-compile"
    return Speed(
        compile=args.compile,
        fuse_qkv=args.fuse_qkv,
        channels_last=args.channels_last,
        vae_decode=args.vae_decode,
        fp8=args.fp8,
        compile_sizes=args.compile_sizes,
        compile_cache_dir=compile_cache,
        png_level=args.png_level,
    )


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=options.directory, help="model cache [REFINERY_CACHE_DIR]")
    parser.add_argument(
        "--cache-read-only",
        action="store_const",
        const=True,
        help="the model cache is a shared volume filled elsewhere: serve what it holds, never write to it "
        "[REFINERY_CACHE_READ_ONLY]",
    )


def add_log_flags(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    parser.add_argument(
        "--log-json",
        action="store_const",
        const=True,
        default=options.flag_on(env.get("REFINERY_LOG_JSON", "")),
        help="log one JSON object per line [REFINERY_LOG_JSON]",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


def tracing(env: Mapping[str, str]) -> str | None:
    """The OpenTelemetry exporter the standard OTEL_* environment asks for (README "Tracing"); None: off."""
    try:
        return tracing_exporter(env)
    except ValueError as exc:  # an exporter or OTLP protocol this server does not ship
        raise UsageError(str(exc)) from None


def store_settings(args: argparse.Namespace, env: Mapping[str, str]) -> StoreSettings:
    try:
        return StoreSettings.from_env(env, cache_dir=args.cache_dir, read_only=args.cache_read_only)
    except ValueError as exc:  # e.g. REFINERY_CACHE_MAX_BYTES that is not a size
        raise UsageError(str(exc)) from None


def server_settings(args: argparse.Namespace, env: Mapping[str, str], *, in_process: bool) -> Settings:
    """Settings for `refinery serve`, or (`in_process`) for the server inside `refinery generate`."""
    store = store_settings(args, env)
    common = {"store": store, "devices": args.devices, "log_json": bool(args.log_json), "tracing": tracing(env)}
    common["images"] = image_settings(args, store)
    if in_process:
        # Loopback only, any free port; nothing pinned, so the stream shows the models loading. Local models
        # in the current folder, or named on this command line (LoRAs too), are the caller's own files. Untuned: one
        # request would not pay for a compile.
        loras = [*getattr(args, "lora", ()), *getattr(args, "refiner_lora", ())]
        named = [getattr(args, "model", None), getattr(args, "refiner", None), *(lora.model for lora in loras)]
        roots = local_roots_of_the_caller(named)
        security = Security(local_model_roots=roots)
        # The models named on the command line are the caller's choice, as a pull would be: downloaded on demand.
        common["store"] = dataclasses.replace(common["store"], on_demand=OnDemandPolicy.parse("any"))
        return Settings(
            **common,
            host="127.0.0.1",
            port=0,
            pins=(),
            drain_delay_s=0.0,
            security=security,
            speed=Speed(compile="off"),
        )
    _distinct_ports(args)
    pins = _pins(args)
    limits = Limits(max_work=args.max_work)
    return Settings(
        **common,
        host=args.host,
        port=args.port,
        default_model=args.model,
        default_refiner=args.refiner,
        pins=pins if pins is not None else (PairKey(args.model, args.refiner),),
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batching=args.batching,
        encode_threads=args.encode_threads,
        budget_bytes=args.budget,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        grace_period_s=args.grace,
        drain_delay_s=args.drain_delay,
        limits=limits,
        security=security_settings(args, env),
        speed=speed_settings(args, store),
    )


def security_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Security:
    try:
        roots = args.local_models or [
            options.local_root(p) for p in env.get("REFINERY_LOCAL_MODELS", "").split(os.pathsep) if p
        ]
    except ValueError as exc:
        raise UsageError(f"REFINERY_LOCAL_MODELS: {exc}") from None
    return Security(
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        token=secret(env, "REFINERY_TOKEN"),
        admin_token=secret(env, "REFINERY_ADMIN_TOKEN"),
        trust_loopback_admin=args.trust_loopback_admin,
        local_model_roots=tuple(roots),
    )


def _distinct_ports(args: argparse.Namespace) -> None:
    """The gRPC, metrics and health ports are three listeners: two on one port cannot both bind."""
    named = [("--port", args.port), ("--metrics-port", args.metrics_port), ("--health-port", args.health_port)]
    for i, (flag, number) in enumerate(named):
        for other, other_number in named[i + 1 :]:
            if number and number == other_number:
                raise UsageError(f"{flag} and {other} are both {number}: each needs a port of its own")


def only_this_process(security: Security) -> Security:
    """`security` with one secret, drawn for this run, as its only token for every call: for a server this
    command runs on a loopback port (which any user of the machine can reach) and talks to itself. The secret
    lives only in this process; its own client sends it."""
    run_token = secrets.token_urlsafe(32)
    return dataclasses.replace(security, token=run_token, admin_token=run_token)


def local_roots_of_the_caller(models: Sequence[str | None]) -> tuple[Path, ...]:
    """For a server inside a command (loopback, for this caller only): local models in the current folder, or
    named on this command line, are the caller's own files, and so are the folders the links of a named
    model lead into (a Hugging Face cache snapshot's files are links into its `blobs/`): the caller chose
    that model, links and all. Computed once, here, from the caller's own command line; a server's
    `--local-models` roots stay strict (a link out of them is refused)."""
    named = [Path(m.removeprefix("local:")) for m in models if m and m.startswith(("/", "local:"))]
    roots = [Path.cwd(), *(path.parent for path in named)]
    for path in named:
        roots += [f for f in folders_read(path) if not any(f == r or r in f.parents for r in roots)]
    return tuple(dict.fromkeys(roots))


def _pins(args: argparse.Namespace) -> tuple[PairKey, ...] | None:
    """--pin (each may list several), else --pins / REFINERY_PINS, else None (the default pair)."""
    if args.pin:
        if any(group == () for group in args.pin):
            return ()
        return tuple(pair for group in args.pin if group for pair in group)
    pinned: tuple[PairKey, ...] | None = args.pins
    return pinned


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = server_settings(args, env, in_process=False)
    quiet_model_libraries()
    start_prefetch(settings)  # the disk reads the pinned weights while the next line imports torch and diffusers
    from server.app import serve  # torch and diffusers load only when a server runs here

    try:
        await serve(settings)
    except ValueError as exc:  # e.g. --device cuda on a machine without one
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the port is taken
        print(f"refinery: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ModelStoreError as exc:  # a pinned model is unknown, unsafe or of the wrong kind
        print(f"refinery: error: cannot load a pinned pair: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0
