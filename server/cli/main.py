"""The `refinery` command.

    refinery serve [--host H] [--port P] [--devices D[,D...]] [--model AIR] [--refiner AIR|none]
                   [--pin BASE[+REFINER]]... [--max-queue N] [--max-batch N] [--batching continuous|static]
                   [--budget SIZE] [--metrics-port P]
    refinery generate PROMPT [--refiner AIR] [--refiner-start 90%|STEP] [--steps N] [--seed S] [--size WxH]
                             [-n N] [--scheduler NAME] [--format png|jpeg|webp] [-o PATH] [--server ADDR]
                             [--image PATH|REF [--strength S] [--mask PATH|REF [--mask-blur N] [--mask-margin N]]
                              [--refine-only] [--keep DURATION]]
    refinery models pull AIR [--pin] | list | rm AIR | pin AIR | unpin AIR  [--server ADDR]
    refinery status | pin BASE[+REFINER] | unpin BASE[+REFINER]  [--server ADDR]
    refinery proto --out DIR
    refinery --version

Each command lives in its own module (`serve.py`, `generate.py`, `models.py`, `operate.py`) and shares the
terminal helpers (`terminal.py`), the flag converters, exit codes and UsageError (`options.py`) and the way to
reach a server (`connect.py`: address, TLS, tokens). Settings are built from flags, then the environment
(REFINERY_*), as argparse reads them; nothing else reads the environment. This is also the only place that
configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from server.cli import generate, models, operate, serve
from server.cli.options import EXIT_USAGE, UsageError
from server.core.logs import configure_logging

EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace, Mapping[str, str]], Coroutine[Any, Any, int]]
COMMANDS: dict[str, Command] = {
    "serve": serve.run,
    "generate": generate.run,
    "models": models.run,
    "status": operate.run,
    "pin": operate.run,
    "unpin": operate.run,
    "proto": operate.run,
}


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery", description="Two-stage SDXL generation (base, then refiner) over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"refinery {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands, env)
    generate.add_parser(commands, env)
    models.add_parser(commands, env)
    operate.add_parsers(commands, env)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("refinery")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser(env).parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    try:
        configure_logging(level.upper(), json_format=bool(args.log_json))
    except ValueError as exc:
        print(f"refinery: error: --log-level: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(COMMANDS[args.command](args, env))
    except UsageError as exc:
        print(f"refinery: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
