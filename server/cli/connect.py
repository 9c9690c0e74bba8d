"""How the CLI reaches a running server: its address, TLS (a CA to trust; a client certificate for mTLS) and
the bearer token, all from flags or the environment, the same for every command. Generate goes through the
`refinery.client` package; the other services through plain stubs on a channel made the same way."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from refinery.client import TLS, AsyncClient
from refinery.client.channel import open_aio_channel
from refinery.client.metadata import auth_metadata
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


def token(env: Mapping[str, str], *, admin: bool) -> str | None:
    """REFINERY_ADMIN_TOKEN for administration (else REFINERY_TOKEN), REFINERY_TOKEN for the rest; or the
    files their `_FILE` variables name."""
    if admin:
        return secret(env, "REFINERY_ADMIN_TOKEN") or secret(env, "REFINERY_TOKEN")
    return secret(env, "REFINERY_TOKEN") or secret(env, "REFINERY_ADMIN_TOKEN")


def client(address: str, args: argparse.Namespace, env: Mapping[str, str]) -> AsyncClient:
    return AsyncClient(address, token=token(env, admin=False), tls=tls(args))


def channel(address: str, args: argparse.Namespace, env: Mapping[str, str], *, admin: bool) -> grpc.aio.Channel:
    """A channel whose every call carries the token (`admin`: the admin token where there is one)."""
    settings = tls(args)
    bearer = token(env, admin=admin)
    interceptors = [_Bearer(bearer), _BearerStream(bearer)] if bearer else []
    return open_aio_channel(address, tls=settings, interceptors=interceptors)


def _with_token(details: grpc.aio.ClientCallDetails, secret: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in auth_metadata(secret):
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _Bearer(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._secret), request)


class _BearerStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._secret), request)
