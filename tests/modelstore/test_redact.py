"""What may reach a log line or an error message."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest

from modelstore._redact import REDACTED, for_log, redact, redact_url, summarise, url_for_log

PRESIGNED = (
    "https://bucket.r2.cloudflarestorage.com/models/123/model.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIA%2F20260101&X-Amz-Expires=86400&X-Amz-Signature=deadbeefcafe"
    "&response-content-disposition=attachment"
)


def test_presigned_urls_lose_their_query_but_keep_where_they_point() -> None:
    assert redact_url(PRESIGNED) == "https://bucket.r2.cloudflarestorage.com/models/123/model.safetensors?<redacted>"
    assert redact_url("https://b2.example/file?Authorization=abc") == "https://b2.example/file?<redacted>"
    assert redact_url("https://user:secret@civitai.com/api/download/models/1?token=abc").endswith("?<redacted>")
    assert "secret" not in redact_url("https://user:secret@civitai.com/x")


def test_harmless_queries_are_kept() -> None:
    url = "https://civitai.com/api/download/models/128080?fileId=126004"
    assert redact_url(url) == url


def test_text_with_urls_tokens_and_known_secrets() -> None:
    text = f"GET {PRESIGNED} failed; sent Authorization: Bearer abc.def-123 and my-token-123456 too"
    cleaned = redact(text, ["my-token-123456", None])
    assert "deadbeefcafe" not in cleaned and "AKIA" not in cleaned
    assert "abc.def-123" not in cleaned and "my-token-123456" not in cleaned
    assert "bucket.r2.cloudflarestorage.com/models/123/model.safetensors" in cleaned


def test_urls_without_their_origin_lose_a_secret_query_too() -> None:
    # How urllib3 logs a request, and how requests names the URL in a connection error.
    logged = 'http://127.0.0.1:9 "GET /bucket/m?X-Amz-Signature=deadbeefcafe&x=1 HTTP/1.1" 200 12'
    failed = "Max retries exceeded with url: /bucket/m?X-Amz-Credential=AKIA%2F1 (Caused by timeout)"
    assert redact(logged) == 'http://127.0.0.1:9 "GET /bucket/m?<redacted> HTTP/1.1" 200 12'
    assert redact(failed) == "Max retries exceeded with url: /bucket/m?<redacted> (Caused by timeout)"
    harmless = "GET /api/download/models/128080?fileId=126004 and https://civitai.com/a?fileId=1"
    assert redact(harmless) == harmless


TOKEN = "civitai-secret-token-0123456789abcdef"


TRICKY = "tok/en+with&odd=chars-0123456789"


@pytest.mark.parametrize(
    ("secret", "echo", "around"),
    [
        (TOKEN, TOKEN.upper(), 0),
        (TOKEN, TOKEN.title(), 0),
        (TOKEN, TOKEN.encode().hex().upper(), 0),
        (TOKEN, base64.b64encode(TOKEN.encode()).decode(), 0),
        # Inside a longer encoding: what encodes the bytes around the token stays, with the one character that
        # mixes their bits with the token's (at the start; a token that ends the input goes with its padding).
        (TOKEN, base64.urlsafe_b64encode(f"Bearer {TOKEN}".encode()).decode(), -(-len("Bearer ") * 4 // 3) + 1),
        (TOKEN, base64.b64encode(f"user:{TOKEN}".encode()).decode(), -(-len("user:") * 4 // 3) + 1),
        (TOKEN, base64.b64encode(f"xy{TOKEN}!".encode()).decode(), 8),
        (TRICKY, quote(TRICKY, safe=""), 0),
        (TRICKY, quote(TRICKY, safe="").lower(), 0),
    ],
    ids=["upper", "title", "hex", "base64", "base64url-bearer", "basic", "base64-offset-2", "url-encoded", "lower"],
)
def test_a_secret_is_found_in_every_shape_a_server_echoes_it_in(secret: str, echo: str, around: int) -> None:
    cleaned = redact(f"request refused: {echo}; try again", [secret])
    assert cleaned.startswith("request refused: ") and cleaned.endswith("; try again")
    assert echo not in cleaned and REDACTED in cleaned
    assert len(cleaned) <= len(f"request refused: {REDACTED}; try again") + around


def test_a_secret_cut_by_the_summary_leaves_no_readable_prefix() -> None:
    text = "x" * 190 + TOKEN
    summary = summarise(text, 200, [TOKEN])
    assert TOKEN[:8] not in summary and len(summary) <= 200


def test_log_lines_carry_no_query_string_whatever_its_names() -> None:
    line = 'GET https://cdn.example/m.safetensors?t=opaque-1&fileId=3 and "GET /bucket/m?download=x HTTP/1.1"'
    logged = for_log(line)
    assert logged == 'GET https://cdn.example/m.safetensors?<redacted> and "GET /bucket/m?<redacted> HTTP/1.1"'
    assert url_for_log("https://u:p@civitai.com/api/download/models/1?fileId=2#f") == (
        "https://civitai.com/api/download/models/1?<redacted>"
    )
