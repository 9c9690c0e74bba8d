"""What may reach a log line or an error message."""

from __future__ import annotations

from modelstore._redact import redact, redact_url

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
