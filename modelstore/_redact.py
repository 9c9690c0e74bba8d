"""Redaction of secrets in text that may reach a log line or an error message.

Two kinds of secret travel with downloads (shared/research/modelstore.md §4.3): API tokens (CIVITAI_TOKEN,
HF_TOKEN, sent as `Authorization: Bearer`) and presigned storage URLs, whose query string is itself a bearer
credential for a day (`X-Amz-Signature`, `X-Amz-Credential`, `token=`, ...). Everything the store logs or puts
in an exception goes through `redact`, so a secret cannot leak by way of a URL, a server's error text or an
exception's message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

REDACTED = "<redacted>"

# Query parameter names that carry credentials in presigned S3/R2/B2/GCS/CloudFront URLs and token-in-URL
# APIs. Matched as substrings of the lower-cased name, so `X-Amz-Signature` and `b2Authorization` are caught.
_SECRET_PARAMS = ("signature", "credential", "token", "key", "auth", "sig", "policy", "security", "secret")
_URL = re.compile(r"https?://[^\s\"'<>]+", re.IGNORECASE)
# A URL without its origin, as urllib3 logs a request (`"GET /bucket/m?X-Amz-Signature=... HTTP/1.1" 200`) and
# names it in errors (`Max retries exceeded with url: /bucket/m?...`): a path that starts at a word boundary.
_PATH_WITH_QUERY = re.compile(r"(?<![\w.:/\-])(/[^\s\"'<>?]*)\?([^\s\"'<>()]+)")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]+")
# Anything shorter is too likely to match ordinary text; real tokens are 32+ characters.
_MIN_SECRET_LEN = 6


def redact_url(url: str) -> str:
    """`url` without credentials: no user-info, and no query string if any parameter looks secret."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_query(parts.query), ""))


def _redact_query(query: str) -> str:
    """`query`, or REDACTED if any of its parameters looks like a credential."""
    names = [name.lower() for name, _ in parse_qsl(query, keep_blank_values=True)]
    return REDACTED if any(secret in name for name in names for secret in _SECRET_PARAMS) else query


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with URLs redacted (see `redact_url`; also those without an origin, `/path?query`), bearer
    tokens hidden, and each of `secrets` removed."""
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET_LEN:
            text = text.replace(secret, REDACTED)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    text = _PATH_WITH_QUERY.sub(lambda m: f"{m.group(1)}?{_redact_query(m.group(2))}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
