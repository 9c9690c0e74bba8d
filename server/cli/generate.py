"""`refinery generate`: one request, its progress on the terminal, its images written to files.

Without `--server` it starts a server in this process on a free loopback port and talks to it over real gRPC,
so it behaves exactly like a remote call.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

from PIL import Image as PILImage

from refinery.client import (
    AsyncClient,
    Branch,
    GenerateOptions,
    Image,
    OutputFormat,
    Preview,
    PromptWeighting,
    Refiner,
    RefineryError,
    Scheduler,
    generate_request,
)
from refinery.v1 import generation_pb2 as pb
from server.cli import connect, from_image, options, serve
from server.cli.options import UsageError
from server.cli.side_by_side import side_by_side
from server.cli.terminal import ProgressView, report_failure
from server.core.logs import quiet_model_libraries

WINDOW_TOKENS = 75  # what one text-encoder window holds besides its start and end tokens (CLIP's 77)
_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], env: Mapping[str, str]) -> None:
    gen = commands.add_parser("generate", help="generate images and write them to files")
    count = options.argument_type(options.count)
    gen.add_argument("prompt")
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--model", help="base model AIR (default: the server's)")
    _add_conditioning(gen)
    gen.add_argument("--refiner", help="refiner AIR; without it (and without --refiner-start) no refiner runs")
    gen.add_argument(
        "--refiner-start",
        type=parse_refiner_start,
        metavar="90%|STEP",
        help="where the refiner takes over: a percentage of the steps (default 90%%) or its first step",
    )
    _add_refiner_controls(gen)
    from_image.add_flags(gen)
    gen.add_argument("--steps", type=count, help="total steps of both stages (default 30)")
    gen.add_argument("--cfg", type=float, help="guidance scale (default 7)")
    gen.add_argument("--seed", type=count, help="seed of the first image (default: random, printed)")
    gen.add_argument("--size", type=parse_size, metavar="WxH", help="default: the model's native size")
    gen.add_argument("-n", "--number", type=count, default=1, help="how many images (seeds seed, seed+1, ...)")
    gen.add_argument("--scheduler", choices=sorted(s.value for s in Scheduler), help="default euler")
    gen.add_argument(
        "--format", choices=sorted(f.value for f in OutputFormat), help="default: from -o's suffix, else png"
    )
    gen.add_argument("-o", "--output", default="out.png", help="file to write; with -n > 1: PATH-0, PATH-1, ...")
    gen.add_argument("--preview-every", type=count, help="ask for a preview every N steps")
    gen.add_argument("--previews", metavar="DIR", help="write previews (JPEG) into DIR")
    connect.add_flags(gen, env, what="default: start one in this process")
    serve.add_device_flags(gen, env)
    serve.add_store_flags(gen)
    serve.add_log_flags(gen, env)


def _add_refiner_controls(gen: argparse.ArgumentParser) -> None:
    """Flags that need a refiner; any of them alone uses the server's default refiner."""
    gen.add_argument(
        "--compare",
        action="store_true",
        help="also write the image the base makes alone (PATH-base-only) and both side by side (PATH-compare)",
    )
    gen.add_argument("--aesthetic-score", type=float, metavar="0..10", help="the refiner's aesthetic score (6)")
    gen.add_argument(
        "--negative-aesthetic-score", type=float, metavar="0..10", help="the refiner's negative aesthetic score (2.5)"
    )
    gen.add_argument("--refiner-prompt", help="the refiner's own prompt (default: the prompt)")
    gen.add_argument("--refiner-negative", help="the refiner's own negative prompt (default: --negative)")
    gen.add_argument(
        "--refiner-lora",
        type=options.argument_type(options.lora),
        action="append",
        default=[],
        metavar="AIR[:WEIGHT]",
        help="a LoRA for the refiner (repeatable); the --lora ones never reach it",
    )


def _add_conditioning(gen: argparse.ArgumentParser) -> None:
    gen.add_argument(
        "--lora",
        type=options.argument_type(options.lora),
        action="append",
        default=[],
        metavar="AIR[:WEIGHT]",
        help="a LoRA for the base model (repeatable); WEIGHT in -4..4, default 1",
    )
    gen.add_argument(
        "--prompt-weighting",
        choices=[w.value for w in PromptWeighting],
        help="how the prompts are read: plain text (none, the default), compel's syntax or AUTOMATIC1111's",
    )


def parse_refiner_start(text: str) -> tuple[str, int]:
    """ "90%" -> start_step_percentage 90; "18" -> start_step 18 (the refiner's first step, 1-based)."""
    value = text.strip()
    field = "start_step"
    if value.endswith("%"):
        field, value = "start_step_percentage", value[:-1].strip()
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a percentage like 90% or a step number, got {text!r}")
    return field, int(value)


def parse_size(text: str) -> tuple[int, int]:
    """ "WxH", or one number for a square."""
    width, sep, height = text.lower().partition("x")
    if not sep:
        height = width
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 1024x768, got {text!r}")
    return int(width), int(height)


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    """The request the flags describe, built by the client package (`refinery.client.generate_request`); an
    image or mask over 96 KiB is refused here, as the command itself uploads it first (`run`)."""
    return generate_request(args.prompt, **generate_options(args))


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    """The client's options for the flags; UsageError for flags that need another (from_image.py)."""
    width, height = args.size if args.size is not None else (0, 0)
    found = GenerateOptions(
        negative_prompt=args.negative or "",
        model=args.model or "",
        refiner=_refiner(args),
        width=width,
        height=height,
        steps=args.steps or 0,
        cfg_scale=args.cfg or 0.0,
        seed=args.seed,
        scheduler=args.scheduler,
        number_results=args.number,
        output_format=output_format(args),
        preview_every=args.preview_every or (1 if args.previews else 0),
        loras=args.lora,
        prompt_weighting=args.prompt_weighting,
    )
    found.update(from_image.image_options(args))
    return found


def _refiner(args: argparse.Namespace) -> Refiner | None:
    """--refiner, --refiner-start, --refine-only or any refiner control; without --refiner: the server's default
    refiner."""
    controls = (args.aesthetic_score, args.negative_aesthetic_score, args.refiner_prompt, args.refiner_negative)
    wants_refiner = args.compare or bool(args.refiner_lora) or any(value is not None for value in controls)
    if args.refiner is None and args.refiner_start is None and not (wants_refiner or args.refine_only):
        return None
    start = ("start_step", 1) if args.refine_only else args.refiner_start  # step 1: every step that runs
    field, value = start if start is not None else ("", None)
    return Refiner(
        model=args.refiner or "",
        start_step=value if field == "start_step" else None,
        start_percentage=value if field == "start_step_percentage" else None,
        compare=args.compare,
        aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score,
        prompt=args.refiner_prompt,
        negative_prompt=args.refiner_negative,
        loras=args.refiner_lora,
    )


def _without_images(generate: GenerateOptions) -> GenerateOptions:
    text_only = generate.copy()
    text_only.pop("image", None)
    text_only.pop("mask", None)
    return text_only


def output_format(args: argparse.Namespace) -> str:
    """--format, else the output file's suffix, else PNG."""
    if args.format:
        return str(args.format)
    return _SUFFIX_FORMATS.get(Path(args.output).suffix.lower(), "png")


def output_path(base: Path, index: int, count: int, kind: str = "") -> Path:
    """PATH for one result; PATH-0, PATH-1, ... (before the suffix) for several. `kind` ("base-only",
    "compare") follows the index: PATH-base-only.png, PATH-1-compare.png."""
    stem = base.stem if count == 1 else f"{base.stem}-{index}"
    if kind:
        stem = f"{stem}-{kind}"
    return base.with_name(f"{stem}{base.suffix}")


@dataclass
class _Written:
    path: Path
    image: Image
    picture: bool = False  # the side-by-side picture, drawn here from the two images


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    generate = generate_options(args)
    try:  # before any server starts; the image and mask are read (and uploaded when large) once one runs
        generate_request(args.prompt, **_without_images(generate))
    except ValueError as exc:  # protobuf refuses a number its field cannot hold
        raise UsageError(f"a value is out of range: {exc}") from None
    async with contextlib.AsyncExitStack() as stack:
        if args.server:
            client = connect.client(args.server, args, env)
        else:
            address, run_token = await stack.enter_async_context(_in_process_server(args, env))
            client = AsyncClient(address, token=run_token)
        stack.push_async_callback(client.close)
        try:
            request = await client.prepare(args.prompt, **generate)
            written = await _stream_to_files(client, request, args)
        except RefineryError as err:
            return report_failure(err)
    _report(written)
    return 0


async def _stream_to_files(
    client: AsyncClient, request: pb.GenerateRequest, args: argparse.Namespace
) -> list[_Written]:
    view = ProgressView()
    written: list[_Written] = []
    count = max(request.number_results, 1)
    out = Path(args.output)
    previews = Path(args.previews) if args.previews else None
    try:
        async for event in client.stream(request):
            view.show(event)
            if isinstance(event, Preview) and previews is not None:
                branch = "-base-only" if event.branch is Branch.BASE_ONLY else ""
                previews.mkdir(parents=True, exist_ok=True)
                name = f"{out.stem}-preview-{event.overall_step:03d}-{event.image_index}{branch}.jpg"
                (previews / name).write_bytes(event.data)
            elif isinstance(event, Image):
                path = output_path(out, event.index, count, "base-only" if event.branch is Branch.BASE_ONLY else "")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(event.data)
                written.append(_Written(path, event))
    finally:
        view.close()
    return written + _side_by_side_pictures(written, out, count, output_format(args))


def _side_by_side_pictures(written: Sequence[_Written], out: Path, count: int, fmt: str) -> list[_Written]:
    """For every result with both images (`--compare`), the labelled picture of the two."""
    base_only = {w.image.index: w for w in written if w.image.branch is Branch.BASE_ONLY}
    pictures = []
    for refined in [w for w in written if w.image.branch is Branch.MAIN and w.image.index in base_only]:
        left_data, right_data = BytesIO(base_only[refined.image.index].image.data), BytesIO(refined.image.data)
        with PILImage.open(left_data) as left, PILImage.open(right_data) as right:
            picture = side_by_side(left, right)
        path = output_path(out, refined.image.index, count, "compare")
        picture.save(path, format=fmt.upper())
        pictures.append(_Written(path, refined.image, picture=True))
    return pictures


def _report(written: Sequence[_Written]) -> None:
    if not written:
        return
    refined = [w.image for w in written if w.image.branch is Branch.MAIN]
    first = refined[0] if refined else written[0].image
    models = first.model + (f" + refiner {first.refiner_model}" if first.refiner_model else "")
    alone = [w.image for w in written if w.image.branch is Branch.BASE_ONLY]
    compared = f"; base only: {alone[0].base_steps} steps" if alone else ""
    print(f"model {models}; {from_image.steps_text(first)}{compared}")
    for line in (loras_line(first), tokens_line(first)):
        if line:
            print(line)
    for item in sorted(written, key=lambda w: w.image.index):
        image = item.image
        if item.picture:
            print(f"wrote {item.path} (base only | refined, side by side, seed {image.seed})")
        else:
            only = ", base only" if image.branch is Branch.BASE_ONLY else ""
            what = f"{image.width}x{image.height}, {image.mime_type}, seed {image.seed}{only}"
            print(f"wrote {item.path} ({what}{from_image.kept_text(image)})")


def loras_line(image: Image) -> str:
    """The LoRAs the server applied, per stage with their weights; "" without any. Every image of a request has
    the same ones (a base-only image lacks the refiner's), so the refined image speaks for all."""
    stages = [
        f"{stage} " + ", ".join(f"{lora.model} (weight {lora.weight:g})" for lora in loras)
        for stage, loras in (("base", image.loras), ("refiner", image.refiner_loras))
        if loras
    ]
    return f"loras: {'; '.join(stages)}" if stages else ""


def tokens_line(image: Image) -> str:
    """What each text encoder read, only when a prompt took more than one 75-token window (a prompt that fits
    one reads as it always did, and saying so on every run would be noise); "" otherwise."""
    if all(tokens.chunks <= 1 for tokens in image.prompt_tokens):
        return ""
    read = [
        f"{t.stage} {t.text_encoder} {t.positive_tokens} + {t.negative_tokens} in {t.chunks}"
        for t in image.prompt_tokens
    ]
    return f"tokens read (prompt + negative, in {WINDOW_TOKENS}-token windows): {', '.join(read)}"


@contextlib.asynccontextmanager
async def _in_process_server(args: argparse.Namespace, env: Mapping[str, str]) -> AsyncIterator[tuple[str, str]]:
    """A server on a free loopback port for this command alone, and the secret its every call needs: any user of
    the machine can reach a loopback port, and this server reads the caller's files (issue 21, item 3). The
    secret is random per run, lives only in this process, and is sent by this command's own client."""
    settings = serve.server_settings(args, env, in_process=True)
    settings = replace(settings, security=serve.only_this_process(settings.security))
    run_token = settings.security.token
    assert run_token is not None
    quiet_model_libraries()
    from server.app import RefineryServer  # torch and diffusers load only when a server runs here

    try:
        server = RefineryServer(settings)
    except ValueError as exc:  # e.g. --device cuda on a machine without one
        raise UsageError(str(exc)) from None
    async with server:
        yield f"127.0.0.1:{server.port}", run_token
