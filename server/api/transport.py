"""How the server listens: gRPC channel options (message limits, keepalive), TLS and mTLS credentials, and the
optional plaintext port that serves only health (for probes that cannot speak TLS)."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from server.api.lenient import LenientInterceptor
from server.core.settings import Security, Settings


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        # Images travel whole, one per message: gRPC's 4 MiB default is too small for what the server sends.
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # What it receives is small: the largest valid request is about 73 KB (settings.max_request_bytes). A
        # larger one is refused from its length prefix, before it is buffered (32 concurrent 60 MiB requests
        # once held 3.9 GB).
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        # ...but HTTP/2 flow control may let a client send far more than that before the refusal: gRPC grows
        # its receive windows as it measures the link (BDP probing): 32 streams of 60 MiB requests on loopback
        # usually grew the server by ~20 MiB before the refusals, and once by 320 MiB. A server that only ever
        # receives small requests keeps the default 64 KiB windows (the same burst: under 2 MiB).
        ("grpc.http2.bdp_probe", 0),
        # Long generations are quiet between events and clients keep their connections alive with pings.
        # gRPC's server default (no pings more often than every 5 minutes, GOAWAY "too_many_pings" after 2)
        # drops clients that ping every 10-60 s, so accept pings every 10 s, also with no call running.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Our own pings find clients that vanished without closing (their requests are then cancelled).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC binds with SO_REUSEPORT by default: a second server on a taken port would silently share it.
        ("grpc.so_reuseport", 0),
    ]


def credentials(security: Security) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured (None: plaintext). Raises ValueError naming the
    setting when a file is missing or a half of the pair is."""
    if security.tls_cert is None and security.tls_key is None:
        if security.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if security.tls_cert is None or security.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    chain = _read(security.tls_cert, "--tls-cert")
    key = _read(security.tls_key, "--tls-key")
    roots = _read(security.tls_client_ca, "--tls-client-ca") if security.tls_client_ca is not None else None
    _check_pem(security)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=roots, require_client_auth=roots is not None)


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting} {path}: {exc.strerror or exc}") from None


def _check_pem(security: Security) -> None:
    """gRPC takes any bytes here and fails later, as "Failed to bind": parse them first (OpenSSL, as gRPC does),
    so a file that is not PEM, a key that is not the certificate's, or a CA file without a certificate is
    refused naming its setting."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password: an encrypted key (which gRPC cannot use) fails here instead of prompting.
        context.load_cert_chain(security.tls_cert, security.tls_key, password=lambda: b"")  # type: ignore[arg-type]
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(
            f"--tls-cert {security.tls_cert} / --tls-key {security.tls_key}: not a PEM certificate chain and its "
            f"private key ({exc.args[-1] if exc.args else exc})"
        ) from None
    if security.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=security.tls_client_ca)
        except (ssl.SSLError, ValueError) as exc:
            reason = exc.args[-1] if exc.args else exc
            raise ValueError(f"--tls-client-ca {security.tls_client_ca}: not PEM certificates ({reason})") from None


def bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    """Listen on `address` (port 0: a free one); the bound port. OSError when it cannot."""
    try:
        if creds is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, creds))
    except RuntimeError as exc:  # grpc's way of saying the address is taken or does not resolve
        raise OSError(f"cannot listen on {address}: {exc}") from None


def health_only_server(servicer: health.aio.HealthServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with nothing but grpc.health.v1 (the same servicer, so the same answers): for
    Kubernetes' native gRPC probes, which cannot present TLS credentials."""
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)],
        interceptors=[LenientInterceptor()],  # garbage gets INVALID_ARGUMENT, not a traceback in the log
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server, bind(server, address, None)
