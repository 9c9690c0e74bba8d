"""Where a token may go when servers redirect, and what a failed connection says about its URL."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import requests

from modelstore._http import TRANSPORT_ERRORS, BrokenTransfer, describe, get
from tests.fakes.server import FakeServer, Handler, Seen

TOKEN = "Bearer a-token-0123456789abcdef"


class Redirector(FakeServer):
    """Answers the paths in `hops` with a 302 to where they point, anything else with 200 "ok"."""

    def __init__(self) -> None:
        super().__init__()
        self.hops: dict[str, str] = {}

    def handle(self, handler: Handler, request: Seen) -> None:
        if request.path in self.hops:
            handler.send_body(302, b"", {"Location": self.hops[request.path]})
        else:
            handler.send_body(200, b"ok")

    def authorization(self) -> dict[str, str | None]:
        return {r.path: r.headers.get("authorization") for r in self.requests}


@pytest.fixture
def servers() -> Iterator[tuple[Redirector, Redirector]]:
    api, storage = Redirector(), Redirector()
    yield api, storage
    api.close()
    storage.close()


def test_a_token_follows_redirects_on_its_origin_and_is_dropped_for_good_elsewhere(
    servers: tuple[Redirector, Redirector],
) -> None:
    api, storage = servers
    api.hops = {"/start": "/same", "/same": f"{storage.url}/away"}
    storage.hops = {"/away": f"{api.url}/back"}  # the way back does not bring the token back
    with requests.Session() as session:
        response = get(session, f"{api.url}/start", {"Authorization": TOKEN}, follow_redirects=True)
        assert response.content == b"ok"
    assert api.authorization() == {"/start": TOKEN, "/same": TOKEN, "/back": None}
    assert storage.authorization() == {"/away": None}


def test_redirects_are_not_followed_unless_asked(servers: tuple[Redirector, Redirector]) -> None:
    api, storage = servers
    api.hops = {"/start": f"{storage.url}/file"}
    with requests.Session() as session:
        assert get(session, f"{api.url}/start", {"Authorization": TOKEN}).status_code == 302
    assert storage.requests == []


def test_a_redirect_loop_is_a_broken_transfer(servers: tuple[Redirector, Redirector]) -> None:
    api, _ = servers
    api.hops = {"/loop": "/loop"}
    with requests.Session() as session, pytest.raises(BrokenTransfer, match="redirects"):
        get(session, f"{api.url}/loop", {}, follow_redirects=True)


def test_a_refused_connection_is_described_without_the_urls_secrets() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nobody listens here once the probe is closed
    with requests.Session() as session, pytest.raises(TRANSPORT_ERRORS) as caught:
        get(session, f"http://127.0.0.1:{port}/bucket/m?X-Amz-Signature=deadbeefcafe", {})
    text = describe(caught.value)
    assert "deadbeefcafe" not in text and "\n" not in text
