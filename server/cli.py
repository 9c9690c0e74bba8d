"""The `refinery` command.

    refinery serve [--host H] [--port P] [--devices D[,D...]] [--model AIR] [--refiner AIR|none]
                   [--pin BASE[+REFINER]]... [--max-queue N] [--max-batch N] [--budget SIZE] [--metrics-port P]
    refinery generate PROMPT [--refiner AIR] [--refiner-start 90%|STEP] [--steps N] [--seed S] [--size WxH]
                             [-n N] [--scheduler NAME] [--format png|jpeg|webp] [-o PATH] [--server ADDR]
    refinery models pull AIR [--pin] | list | rm AIR  [--server ADDR]     (server/cli_models.py)

`generate` without `--server` starts a server in this process on a free loopback port and talks to it over
real gRPC, so it behaves exactly like a remote call. Settings are built here, from flags and then the
environment (REFINERY_*), and passed down; nothing else reads the environment. This is also the only place
that configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from modelstore import StoreSettings, parse_air
from modelstore.errors import InvalidModelId, ModelStoreError
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server import cli_models
from server._progress import ProgressView
from server.logs import configure_logging, quiet_model_libraries
from server.pins import parse_pin
from server.settings import DEFAULT_BASE, DEFAULT_REFINER, Settings

log = logging.getLogger(__name__)

SCHEDULERS = {
    "euler": pb.SCHEDULER_EULER,
    "euler_ancestral": pb.SCHEDULER_EULER_ANCESTRAL,
    "ddim": pb.SCHEDULER_DDIM,
    "dpmpp_2m": pb.SCHEDULER_DPMPP_2M,
    "dpmpp_2m_karras": pb.SCHEDULER_DPMPP_2M_KARRAS,
    "unipc": pb.SCHEDULER_UNIPC,
}
FORMATS = {"png": pb.OUTPUT_FORMAT_PNG, "jpeg": pb.OUTPUT_FORMAT_JPEG, "webp": pb.OUTPUT_FORMAT_WEBP}
_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

EXIT_FAILED = 1
EXIT_USAGE = 2  # also INVALID_ARGUMENT from the server: the request as given can never work
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad flag or environment value; reported in one line with exit code 2."""


# ---- settings ---------------------------------------------------------------------------------------------


def server_settings(args: argparse.Namespace, env: Mapping[str, str], *, in_process: bool) -> Settings:
    """Flags win over REFINERY_* variables, which win over the defaults."""

    def pick(flag: object, name: str, default: str) -> str:
        return str(flag) if flag is not None else env.get(name, default)

    store = StoreSettings.from_env(env, cache_dir=args.cache_dir)
    default_model = pick(getattr(args, "default_model", None), "REFINERY_MODEL", DEFAULT_BASE)
    refiner_text = pick(getattr(args, "default_refiner", None), "REFINERY_REFINER", DEFAULT_REFINER)
    default_refiner = None if refiner_text.lower() in ("", "none") else refiner_text
    for what, model in (("default model", default_model), ("default refiner", default_refiner)):
        if model is not None:
            try:
                parse_air(model)
            except InvalidModelId as exc:
                raise UsageError(f"{what}: {exc}") from None
    pins: tuple[str, ...]
    metrics_port = 0
    if in_process:
        # Loopback only, any free port; nothing pinned, so the stream shows the models loading.
        host, port, pins = "127.0.0.1", 0, ()
    else:
        host = pick(args.host, "REFINERY_HOST", "0.0.0.0")
        port = _int(pick(args.port, "REFINERY_PORT", "50051"), "port")
        pin_texts = args.pin if args.pin else [p for p in env.get("REFINERY_PINS", "").split(",") if p.strip()]
        if any(p.strip().lower() == "none" for p in pin_texts):
            pins = ()
        elif pin_texts:
            pins = tuple(p.strip() for p in pin_texts)
        else:
            pins = (default_model + (f"+{default_refiner}" if default_refiner else ""),)
        for pin in pins:
            try:
                parse_pin(pin)
            except (ValueError, InvalidModelId) as exc:
                raise UsageError(f"--pin {pin}: {exc}") from None
        metrics_port = _int(pick(args.metrics_port, "REFINERY_METRICS_PORT", "0"), "metrics port")
    grace = _float(pick(getattr(args, "grace", None), "REFINERY_GRACE_PERIOD", "30"), "grace period")
    devices_text = pick(args.devices, "REFINERY_DEVICES", "auto")
    devices = tuple(d.strip() for d in devices_text.split(",") if d.strip()) or ("auto",)
    return Settings(
        store=store,
        host=host,
        port=port,
        devices=devices,
        default_model=default_model,
        default_refiner=default_refiner,
        pins=pins,
        max_queue=_positive(pick(getattr(args, "max_queue", None), "REFINERY_MAX_QUEUE", "64"), "max queue"),
        max_batch=_positive(pick(getattr(args, "max_batch", None), "REFINERY_MAX_BATCH", "4"), "max batch"),
        encode_threads=_non_negative(
            pick(getattr(args, "encode_threads", None), "REFINERY_ENCODE_THREADS", "2"), "encode threads"
        ),
        budget_bytes=parse_bytes(pick(getattr(args, "budget", None), "REFINERY_BUDGET", "0")),
        metrics_port=metrics_port,
        grace_period_s=grace,
        log_json=bool(args.log_json) or env.get("REFINERY_LOG_JSON", "") not in ("", "0", "false"),
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """ "20GiB", "512MB", "1000000" -> bytes."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgib")
    unit = value[len(number) :]
    if unit not in _UNITS:
        raise UsageError(f"size {text!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB")
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise UsageError(f"size {text!r} is not a number") from None


def _positive(text: str, what: str) -> int:
    value = _int(text, what)
    if value < 1:
        raise UsageError(f"{what} must be at least 1, got {value}")
    return value


def _non_negative(text: str, what: str) -> int:
    value = _int(text, what)
    if value < 0:
        raise UsageError(f"{what} must be 0 or more, got {value}")
    return value


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what} must be an integer, got {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{what} must be a number, got {text!r}") from None


# ---- generate ---------------------------------------------------------------------------------------------


def parse_refiner_start(text: str) -> tuple[str, int]:
    """ "90%" -> start_step_percentage 90; "18" -> start_step 18 (the refiner's first step, 1-based)."""
    value = text.strip()
    field = "start_step"
    if value.endswith("%"):
        field, value = "start_step_percentage", value[:-1].strip()
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a percentage like 90% or a step number, got {text!r}")
    return field, int(value)


def count(text: str) -> int:
    """A whole number >= 0 (the request's fields are unsigned; the server checks the upper bounds)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def parse_size(text: str) -> tuple[int, int]:
    """ "WxH", or one number for a square."""
    width, sep, height = text.lower().partition("x")
    if not sep:
        height = width
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 1024x768, got {text!r}")
    return int(width), int(height)


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        positive_prompt=args.prompt,
        negative_prompt=args.negative or "",
        model=args.model or "",
        steps=args.steps or 0,
        cfg_scale=args.cfg or 0.0,
        number_results=args.number,
        scheduler=SCHEDULERS[args.scheduler] if args.scheduler else pb.SCHEDULER_UNSPECIFIED,
        output_format=FORMATS[output_format(args)],
        preview_every=args.preview_every or (1 if args.previews else 0),
    )
    if args.seed is not None:
        request.seed = args.seed
    if args.size is not None:
        request.width, request.height = args.size
    if args.refiner is not None or args.refiner_start is not None:
        # --refiner-start alone uses the server's default refiner.
        request.refiner.model = args.refiner or ""
        if args.refiner_start is not None:
            field, value = args.refiner_start
            setattr(request.refiner, field, value)
    return request


def output_format(args: argparse.Namespace) -> str:
    """--format, else the output file's suffix, else PNG."""
    if args.format:
        return str(args.format)
    return _SUFFIX_FORMATS.get(Path(args.output).suffix.lower(), "png")


def output_path(base: Path, index: int, count: int) -> Path:
    """PATH for one result; PATH-0, PATH-1, ... (before the suffix) for several."""
    if count == 1:
        return base
    return base.with_name(f"{base.stem}-{index}{base.suffix}")


@dataclass
class _Written:
    path: Path
    image: pb.Image


async def _stream_to_files(
    stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest, args: argparse.Namespace
) -> list[_Written]:
    view = ProgressView()
    written: list[_Written] = []
    count = max(request.number_results, 1)
    out = Path(args.output)
    previews = Path(args.previews) if args.previews else None
    try:
        async for response in stub.Generate(request):
            view.show(response)
            kind = response.WhichOneof("event")
            if kind == "preview" and previews is not None:
                p = response.preview
                previews.mkdir(parents=True, exist_ok=True)
                name = f"{out.stem}-preview-{p.overall_step:03d}-{p.image_index}.jpg"
                (previews / name).write_bytes(p.data)
            elif kind == "image":
                image = response.image
                path = output_path(out, image.index, count)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(image.data)
                written.append(_Written(path, image))
    finally:
        view.close()
    return written


def _report(written: Sequence[_Written]) -> None:
    if not written:
        return
    first = written[0].image
    models = first.model + (f" + refiner {first.refiner_model}" if first.refiner_model else "")
    steps = f"{first.base_steps} base" + (f" + {first.refiner_steps} refiner" if first.refiner_steps else "")
    print(f"model {models}; {steps} steps")
    for item in sorted(written, key=lambda w: w.image.index):
        image = item.image
        print(f"wrote {item.path} ({image.width}x{image.height}, {image.mime_type}, seed {image.seed})")


def _channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        # Ping every 30 s so NATs and proxies keep a quiet stream open (the server accepts every 10 s).
        ("grpc.keepalive_time_ms", 30_000),
    ]


@contextlib.asynccontextmanager
async def _in_process_server(args: argparse.Namespace, env: Mapping[str, str]) -> AsyncIterator[str]:
    settings = server_settings(args, env, in_process=True)
    quiet_model_libraries()
    from server.app import RefineryServer  # torch and diffusers load only when a server runs here

    try:
        server = RefineryServer(settings)
    except ValueError as exc:  # e.g. --device cuda on a machine without one
        raise UsageError(str(exc)) from None
    async with server:
        yield f"127.0.0.1:{server.port}"


async def _generate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        request = build_request(args)
    except ValueError as exc:  # protobuf refuses a number its field cannot hold
        raise UsageError(f"a value is out of range: {exc}") from None
    address = args.server or env.get("REFINERY_SERVER")
    async with contextlib.AsyncExitStack() as stack:
        if not address:
            address = await stack.enter_async_context(_in_process_server(args, env))
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address, options=_channel_options()))
        try:
            stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
            written = await _stream_to_files(stub, request, args)
        except grpc.aio.AioRpcError as err:
            print(describe_rpc_error(err), file=sys.stderr)
            return EXIT_USAGE if err.code() is grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
    _report(written)
    return 0


def describe_rpc_error(err: grpc.aio.AioRpcError) -> str:
    """One line: the status code, and each field violation if the server named fields."""
    violations: list[str] = []
    for key, value in err.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    violations.extend(f"{v.field}: {v.description}" for v in bad.field_violations)
    text = "; ".join(violations) if violations else (err.details() or "")
    return f"error: {err.code().name}: {text}"


# ---- serve ------------------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = server_settings(args, env, in_process=False)
    quiet_model_libraries()
    from server.app import serve

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


# ---- main -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery", description="Two-stage SDXL generation (base, then refiner) over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--devices",
            "--device",
            dest="devices",
            help="comma-separated: auto (default), cpu, cuda, cuda:N; one worker each [REFINERY_DEVICES]",
        )
        p.add_argument("--cache-dir", type=Path, help="model cache [REFINERY_CACHE_DIR]")
        p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
        p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")

    serve = commands.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0) [REFINERY_HOST]")
    serve.add_argument("--port", type=count, help="port (default 50051; 0 = any free port) [REFINERY_PORT]")
    serve.add_argument(
        "--model", dest="default_model", help=f"default base model (default {DEFAULT_BASE}) [REFINERY_MODEL]"
    )
    serve.add_argument(
        "--refiner",
        dest="default_refiner",
        help=f"default refiner, or 'none' (default {DEFAULT_REFINER}) [REFINERY_REFINER]",
    )
    serve.add_argument(
        "--pin",
        action="append",
        metavar="BASE[+REFINER]",
        help="keep this pair resident on every device from start-up (repeatable; 'none' for no pins; default: "
        "the default base+refiner); health is SERVING once pinned pairs are loaded [REFINERY_PINS, comma-separated]",
    )
    serve.add_argument("--max-queue", type=count, help="requests that may wait (default 64) [REFINERY_MAX_QUEUE]")
    serve.add_argument(
        "--max-batch", type=count, help="images denoised together (default 4; 1 = off) [REFINERY_MAX_BATCH]"
    )
    serve.add_argument(
        "--encode-threads",
        type=count,
        help="threads encoding results while the device runs the next batch (default 2; 0 = on the device's "
        "worker) [REFINERY_ENCODE_THREADS]",
    )
    serve.add_argument(
        "--budget",
        help="model memory per device, e.g. 40GiB (default: the device's memory less 25%%) [REFINERY_BUDGET]",
    )
    serve.add_argument(
        "--metrics-port",
        type=count,
        help="serve Prometheus /metrics on this port (default off) [REFINERY_METRICS_PORT]",
    )
    serve.add_argument(
        "--grace",
        type=float,
        help="seconds running requests get on shutdown (default 30) [REFINERY_GRACE_PERIOD]",
    )
    common(serve)

    gen = commands.add_parser("generate", help="generate images and write them to files")
    gen.add_argument("prompt")
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--model", help="base model AIR (default: the server's)")
    gen.add_argument("--refiner", help="refiner AIR; without it (and without --refiner-start) no refiner runs")
    gen.add_argument(
        "--refiner-start",
        type=parse_refiner_start,
        metavar="90%|STEP",
        help="where the refiner takes over: a percentage of the steps (default 90%%) or its first step",
    )
    gen.add_argument("--steps", type=count, help="total steps of both stages (default 30)")
    gen.add_argument("--cfg", type=float, help="guidance scale (default 7)")
    gen.add_argument("--seed", type=count, help="seed of the first image (default: random, printed)")
    gen.add_argument("--size", type=parse_size, metavar="WxH", help="default: the model's native size")
    gen.add_argument("-n", "--number", type=count, default=1, help="how many images (seeds seed, seed+1, ...)")
    gen.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default euler")
    gen.add_argument("--format", choices=sorted(FORMATS), help="default: from -o's suffix, else png")
    gen.add_argument("-o", "--output", default="out.png", help="file to write; with -n > 1: PATH-0, PATH-1, ...")
    gen.add_argument("--preview-every", type=count, help="ask for a preview every N steps")
    gen.add_argument("--previews", metavar="DIR", help="write previews (JPEG) into DIR")
    gen.add_argument("--server", help="HOST:PORT of a running server (default: start one in this process)")
    common(gen)

    cli_models.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = os.environ
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    json_logs = bool(args.log_json) or env.get("REFINERY_LOG_JSON", "") not in ("", "0", "false")
    try:
        configure_logging(level.upper(), json_format=json_logs)
    except ValueError as exc:
        print(f"refinery: error: --log-level: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = {"serve": _serve, "generate": _generate, "models": cli_models.run}[args.command]
    try:
        return asyncio.run(command(args, env))
    except UsageError as exc:
        print(f"refinery: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
