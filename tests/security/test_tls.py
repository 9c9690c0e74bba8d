"""Issue 13, finding 2: TLS on the gRPC port, client certificates (mTLS), and the plaintext port that answers
only health, for probes that cannot speak TLS. Certificates are made for the test with `openssl`."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelstore import ModelStore, StoreSettings
from server.core.settings import Security
from tests.integration.conftest import ServerThread, make_settings

from .conftest import Pki, get_status

TIMEOUT_S = 30
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAILED_HANDSHAKE = grpc.StatusCode.UNAVAILABLE  # how gRPC reports a connection that TLS refused


def secure(address: str, pki: Pki, *, roots: bytes | None = None, cert: str | None = None) -> grpc.Channel:
    pair = {"client": (pki.client_cert, pki.client_key), "stranger": (pki.stranger_cert, pki.stranger_key)}
    chain, key = (p.read_bytes() for p in pair[cert]) if cert else (None, None)
    credentials = grpc.ssl_channel_credentials(roots or pki.ca.read_bytes(), key, chain)
    return grpc.secure_channel(address, credentials)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tls_server(store_settings: StoreSettings, model_store: ModelStore, pki: Pki, **security: object) -> ServerThread:
    settings = make_settings(
        store_settings,
        pins=(),
        security=Security(tls_cert=pki.server_cert, tls_key=pki.server_key, **security),  # type: ignore[arg-type]
    )
    return ServerThread(settings, store=model_store)


@pytest.fixture(scope="module")
def tls(store_settings: StoreSettings, model_store: ModelStore, pki: Pki) -> Iterator[ServerThread]:
    thread = tls_server(store_settings, model_store, pki)
    try:
        yield thread
    finally:
        thread.close()


def test_tls_serves_clients_that_trust_its_certificate(tls: ServerThread, pki: Pki) -> None:
    with secure(f"localhost:{tls.server.port}", pki) as channel:
        assert get_status(channel) is grpc.StatusCode.OK
    with secure(tls.address, pki) as channel:  # the certificate names 127.0.0.1 too
        assert get_status(channel) is grpc.StatusCode.OK


def test_tls_refuses_plaintext_and_clients_that_do_not_trust_it(tls: ServerThread, pki: Pki) -> None:
    with grpc.insecure_channel(tls.address) as channel:
        assert get_status(channel) is FAILED_HANDSHAKE
    with secure(tls.address, pki, roots=pki.stranger_cert.read_bytes()) as channel:
        assert get_status(channel) is FAILED_HANDSHAKE


def test_mtls_needs_a_client_certificate_signed_by_the_ca(
    store_settings: StoreSettings, model_store: ModelStore, pki: Pki
) -> None:
    thread = tls_server(store_settings, model_store, pki, tls_client_ca=pki.ca)
    try:
        with secure(thread.address, pki) as channel:
            assert get_status(channel) is FAILED_HANDSHAKE
        with secure(thread.address, pki, cert="stranger") as channel:
            assert get_status(channel) is FAILED_HANDSHAKE
        with secure(thread.address, pki, cert="client") as channel:
            assert get_status(channel) is grpc.StatusCode.OK
    finally:
        thread.close()


def test_the_health_port_answers_probes_in_plaintext_and_nothing_else(
    store_settings: StoreSettings, model_store: ModelStore, pki: Pki
) -> None:
    settings = make_settings(
        store_settings,
        pins=(),
        security=Security(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca),
        health_port=free_port(),
        drain_delay_s=30.0,  # long enough to look; stop(0) below ends it
    )
    thread = ServerThread(settings, store=model_store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(f"127.0.0.1:{thread.server.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "refinery.v1.GenerationService"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S).status == SERVING
            assert get_status(channel) is grpc.StatusCode.UNIMPLEMENTED  # nothing but health here
            # It reports what the TLS port's health reports: a drain is visible to the probe.
            draining = thread.stop_in_background()
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
            assert any(answer.status == NOT_SERVING for answer in watch)
            watch.cancel()
        thread.call(thread.server.stop(0))
        draining.result(TIMEOUT_S)
    finally:
        thread.close()
