"""Secrets that come back from upstream (issue 13, finding 6): a token echoed in another shape in an error body,
and a credential in a redirect's query string, reach neither the caller's error nor any log line (ours or the
HTTP library's, at every level)."""

from __future__ import annotations

import base64
import logging
from urllib.parse import quote

import pytest

from modelstore.errors import SourcePermissionDenied, SourceUnavailable
from tests.fakes import payloads
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage
from tests.fakes.hub import FakeHub
from tests.modelstore.conftest import CIVITAI_TOKEN, HF_TOKEN, MakeStore

MODEL = "civitai:1@2"
# Where a storage host may put a credential: under a name that says nothing.
HIDDEN_CREDENTIAL = "opaque-credential-0123456789"


def _shapes(token: str) -> list[str]:
    return [
        token,
        token.upper(),
        base64.b64encode(token.encode()).decode(),
        base64.b64encode(f"Bearer {token}".encode()).decode(),
        quote(token, safe=""),
    ]


def test_an_upstream_error_body_is_summarised_and_no_copy_of_the_token_survives(
    make_store: MakeStore, civitai: FakeCivitai, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    civitai.add_version(1, 2, [(FakeFile(3, "m.safetensors"), payloads.checkpoint("base", seed=1))])
    echoed = " ".join(_shapes(CIVITAI_TOKEN))
    civitai.download_errors[2] = (403, {"error": "Forbidden", "message": f"you sent {echoed} " + "blah " * 2000}, {})
    store = make_store()

    with pytest.raises(SourcePermissionDenied) as caught:
        store.resolve(MODEL)

    message = str(caught.value)
    assert message.startswith("civitai does not allow downloading civitai:2+3: Forbidden: you sent")
    assert len(message) < 300  # a summary, never the body whole
    for text in (message, caplog.text):
        for shape in _shapes(CIVITAI_TOKEN):
            assert shape not in text


def test_a_credential_in_a_redirect_is_never_logged(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3's connection pool logs every request line at DEBUG
    civitai.add_version(1, 2, [(FakeFile(3, "m.safetensors"), payloads.checkpoint("base", seed=1))])
    storage.signature_param = "id"
    storage.extra_query = f"&x={HIDDEN_CREDENTIAL}&t={quote(CIVITAI_TOKEN)}"
    storage.sign_uses = 1
    civitai.object_of(2, 3).cut_at, civitai.object_of(2, 3).cut_times = 1000, 1  # a retry gets logged too

    make_store().resolve(MODEL)

    library_lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
    assert any("/bucket/" in line for line in library_lines)  # the library did log the requests...
    for record in caplog.records:
        line = record.getMessage()
        for secret in (HIDDEN_CREDENTIAL, *(r.query["id"] for r in storage.gets()), *_shapes(CIVITAI_TOKEN)):
            assert secret not in line, f"{record.name}: {line}"
        if "/bucket/" in line:  # ...and every line that names storage names it without its query string
            assert "/bucket/2-3?<redacted>" in line or "/bucket/2-3 " in line or line.endswith("/bucket/2-3")


def test_a_hub_error_is_summarised_without_the_token(
    make_store: MakeStore, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hub.fail_api = (500, {"error": f"internal failure for {HF_TOKEN.upper()} " + "x" * 10000})
    with pytest.raises(SourceUnavailable) as caught:
        make_store().resolve("hf:someone/sdxl")
    message = str(caught.value)
    assert "HTTP 500" in message and len(message) < 300
    for text in (message, caplog.text):
        for shape in _shapes(HF_TOKEN):
            assert shape not in text
