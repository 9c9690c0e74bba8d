"""How the clients open their channels: plaintext or TLS (optionally mutual), with a receive limit.
`open_channel` for `Client`, `open_aio_channel` for `AsyncClient` and for plain stubs on grpc.aio (the
`refinery` command's other services)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

# The server's own send limit. With image chunking (generation.proto, ImageChunk) no message exceeds 3 MiB and
# gRPC's 4 MiB default would do; this also fits a server that predates chunking and sends a 2048² PNG (up to
# about 12 MiB) whole, and still bounds what one message can cost this process.
DEFAULT_MAX_RECEIVE_BYTES = 64 << 20


@dataclass(frozen=True)
class TLS:
    """TLS settings, PEM bytes. No root certificates: gRPC's bundled public roots. A certificate chain and its
    private key (both or neither): present them to a server that asks for client certificates (mTLS)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and a key its certificate")

    @classmethod
    def from_files(cls, ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> TLS:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return cls(read(ca), read(cert), read(key))


def channel_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        # A generation can stream nothing for a while (a big model loading); pings notice a vanished server
        # instead of waiting forever. The server accepts pings every 10 s or more.
        ("grpc.keepalive_time_ms", 30_000),
    ]


def channel_credentials(tls: TLS) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)


def open_channel(
    target: str, *, tls: TLS | None = None, max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES
) -> grpc.Channel:
    """A blocking channel to `target`: plaintext without `tls`."""
    options = channel_options(max_receive_bytes)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, channel_credentials(tls), options=options)


def open_aio_channel(
    target: str,
    *,
    tls: TLS | None = None,
    max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to `target`: plaintext without `tls`; `interceptors` (grpc.aio client interceptors)
    see every call."""
    options = channel_options(max_receive_bytes)
    chain = list(interceptors) or None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=chain)
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=options, interceptors=chain)
