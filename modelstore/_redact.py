"""Redaction of secrets in text that may reach a log line or an error message.

Two kinds of secret travel with downloads (shared/research/modelstore.md §4.3): API tokens (CIVITAI_TOKEN,
HF_TOKEN, sent as `Authorization: Bearer`) and presigned storage URLs, whose query string is itself a bearer
credential for a day (`X-Amz-Signature`, `X-Amz-Credential`, `token=`, ...). Everything the store logs or puts
in an exception goes through `redact`, so a secret cannot leak by way of a URL, a server's error text or an
exception's message.

A server may echo a token back in another shape than it was sent (issue 13, finding 6: an upper-cased copy,
or the base64 of an `Authorization` header, came back in an error body): each known secret is also looked for
in any letter case, URL-encoded, hex-encoded, and base64-encoded (standard and URL-safe alphabets, at each of
the three alignments it can have inside a longer encoding such as `Basic base64(user:token)`).

Log lines are stricter than error messages (`for_log`, `url_for_log`): they carry no query string at all,
because a redirect can put a credential in a parameter whose name gives nothing away.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable, Iterable
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit, urlunsplit

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
# A base64 fragment shorter than this (what is left of a very short secret once the characters it shares with
# its neighbours are cut off) would match ordinary words.
_MIN_ENCODED_LEN = 6
# Characters of a base64 encoding that mix bits of the bytes before the secret, per alignment (0, 1 or 2).
_LEADING_MIXED = (0, 2, 3)
_URL_SAFE = str.maketrans("+/", "-_")


def redact_url(url: str) -> str:
    """`url` without credentials: no user-info, and no query string if any parameter looks secret."""
    return _rebuild(url, _redact_query)


def url_for_log(url: str) -> str:
    """`url` as a log line may show it: scheme, host, port and path; no user-info, query or fragment."""
    return _rebuild(url, lambda query: REDACTED if query else "")


def _rebuild(url: str, query: Callable[[str], str]) -> str:
    """`url` without user-info or fragment, its query string replaced by `query(query string)`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, query(parts.query), ""))


def _redact_query(query: str) -> str:
    """`query`, or REDACTED if any of its parameters looks like a credential."""
    names = [name.lower() for name, _ in parse_qsl(query, keep_blank_values=True)]
    return REDACTED if any(secret in name for name in names for secret in _SECRET_PARAMS) else query


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with URLs redacted (see `redact_url`; also those without an origin, `/path?query`), bearer
    tokens hidden, and each of `secrets` removed in every shape a server may echo it back in."""
    text = _hide_secrets(text, secrets)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    text = _PATH_WITH_QUERY.sub(lambda m: f"{m.group(1)}?{_redact_query(m.group(2))}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def for_log(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`redact`, and every query string dropped, whatever its parameters are called."""
    text = _hide_secrets(text, secrets)
    text = _URL.sub(lambda m: url_for_log(m.group(0)), text)
    text = _PATH_WITH_QUERY.sub(lambda m: f"{m.group(1)}?{REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def summarise(text: str, limit: int, secrets: Iterable[str | None] = ()) -> str:
    """`text` as one short redacted line of at most `limit` characters. Redacted before it is cut, so a
    secret that straddles the cut cannot leave a readable prefix behind."""
    text = redact(" ".join(text.split()), secrets)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hide_secrets(text: str, secrets: Iterable[str | None]) -> str:
    usable = tuple(sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LEN}))
    if not usable:
        return text
    return _secrets_pattern(usable).sub(REDACTED, text)


@functools.lru_cache(maxsize=32)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern for every shape of every secret, longest first (so a longer shape is not half-replaced)."""
    case_free: set[str] = set()
    exact: set[str] = set()
    for secret in secrets:
        raw = secret.encode()
        case_free.update({secret, quote(secret, safe=""), quote_plus(secret), raw.hex()})
        exact.update(_base64_shapes(raw))
    shapes = sorted(
        [f"(?i:{re.escape(s)})" for s in case_free] + [re.escape(s) for s in exact - case_free],
        key=len,
        reverse=True,
    )
    return re.compile("|".join(shapes))


def _base64_shapes(raw: bytes) -> set[str]:
    """The characters that encode `raw` in base64 wherever it sits in a longer input: for each alignment, the
    encoding with the characters shared with neighbouring bytes cut off (standard and URL-safe alphabets)."""
    shapes = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw).decode()
        whole = 4 * ((offset + len(raw)) // 3)  # characters of complete groups: nothing after the secret in them
        core = encoded[_LEADING_MIXED[offset] : whole]
        # ...and, for a secret that ends the input (`Bearer <token>`), the rest of the encoding with its padding.
        for shape in (core, encoded[_LEADING_MIXED[offset] :]):
            if len(shape) >= _MIN_ENCODED_LEN:
                shapes.add(shape)
                shapes.add(shape.translate(_URL_SAFE))
    return shapes
