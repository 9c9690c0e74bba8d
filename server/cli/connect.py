"""How the CLI reaches a running server: its address, TLS (a CA to trust; a client certificate for mTLS) and
the bearer tokens, all from flags or the environment, the same for every command, which all talk to it through
the `refinery.client` package's `AsyncClient`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from refinery.client import TLS, AsyncClient
from server.cli import options
from server.cli.options import UsageError, env_flag, secret


def add_flags(parser: argparse.ArgumentParser, env: Mapping[str, str], *, what: str) -> None:
    parser.add_argument(
        "--server", default=env.get("REFINERY_SERVER"), help=f"HOST:PORT of a running server ({what}) [REFINERY_SERVER]"
    )
    for flag, var, help_text in (
        ("--ca-cert", "REFINERY_CA_CERT", "with --server: TLS, trusting this CA (PEM)"),
        ("--client-cert", "REFINERY_CLIENT_CERT", "with --server: a client certificate for mTLS (PEM)"),
        ("--client-key", "REFINERY_CLIENT_KEY", "its private key (PEM)"),
    ):
        env_flag(parser, env, flag, var=var, convert=options.directory, default=None, help=help_text)


def tls(args: argparse.Namespace) -> TLS | None:
    paths: tuple[Path | None, ...] = (args.ca_cert, args.client_cert, args.client_key)
    if not any(paths):
        return None
    try:
        return TLS.from_files(*paths)
    except (OSError, ValueError) as exc:
        raise UsageError(f"TLS: {exc}") from None


def client(address: str, args: argparse.Namespace, env: Mapping[str, str]) -> AsyncClient:
    """A client whose generation and status calls send REFINERY_TOKEN and whose administration sends
    REFINERY_ADMIN_TOKEN, each falling back to the other (the client's rule); or the files their `_FILE`
    variables name."""
    token, admin_token = secret(env, "REFINERY_TOKEN"), secret(env, "REFINERY_ADMIN_TOKEN")
    return AsyncClient(address, token=token, admin_token=admin_token, tls=tls(args))
