"""The `refinery` command.

    refinery serve [--host H] [--port P] [--devices D[,D...]] [--model AIR] [--refiner AIR|none]
                   [--pin BASE[+REFINER]]... [--max-queue N] [--max-batch N] [--budget SIZE] [--metrics-port P]
    refinery generate PROMPT [--refiner AIR] [--refiner-start 90%|STEP] [--steps N] [--seed S] [--size WxH]
                             [-n N] [--scheduler NAME] [--format png|jpeg|webp] [-o PATH] [--server ADDR]
    refinery models pull AIR [--pin] | list | rm AIR | pin AIR | unpin AIR  [--server ADDR]

Each command lives in its own module (`serve.py`, `generate.py`, `models.py`) and shares the terminal helpers
(`terminal.py`) and the flag converters (`options.py`). Settings are built from flags, then the environment
(REFINERY_*), as argparse reads them; nothing else reads the environment. This is also the only place that
configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from server.cli import generate, models, serve
from server.logs import configure_logging

EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace, Mapping[str, str]], Coroutine[Any, Any, int]]
COMMANDS: dict[str, Command] = {"serve": serve.run, "generate": generate.run, "models": models.run}


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery", description="Two-stage SDXL generation (base, then refiner) over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands, env)
    generate.add_parser(commands, env)
    models.add_parser(commands, env)
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser(env).parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    try:
        configure_logging(level.upper(), json_format=bool(args.log_json))
    except ValueError as exc:
        print(f"refinery: error: --log-level: {exc}", file=sys.stderr)
        return serve.EXIT_USAGE
    try:
        return asyncio.run(COMMANDS[args.command](args, env))
    except serve.UsageError as exc:
        print(f"refinery: error: {exc}", file=sys.stderr)
        return serve.EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
