"""HTTP plumbing shared by the sources and the downloader: one client configuration, and one table that turns
an HTTP status into a `modelstore.errors` class (huggingface_hub's `hf_raise_for_status`, for our sources)."""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Iterable

import httpx

from modelstore._redact import redact
from modelstore.errors import (
    ModelNotFound,
    ModelStoreError,
    SourcePermissionDenied,
    SourceRateLimited,
    SourceUnauthenticated,
    SourceUnavailable,
)

# A descriptive non-browser agent: civitai's WAF refuses library defaults, and a browser agent switches its
# download endpoint into "redirect to the login page" mode (modelstore.md §2.3).
USER_AGENT = "refinery-modelstore/0.1 (+https://github.com/refinery)"
# Long reads are normal on a slow link; what matters is that bytes keep arriving.
TIMEOUT = httpx.Timeout(connect=15.0, read=60.0, write=30.0, pool=60.0)
# Error bodies are read only this far: they are messages, never models.
_MAX_ERROR_BODY = 16 * 1024
_MAX_MESSAGE = 300


# httpx logs every request's full URL at INFO and httpcore every response's headers (Location included) at
# DEBUG; a presigned storage URL is a credential (modelstore.md §4.3). Logger filters are not inherited, so
# each logger that these libraries (and huggingface_hub's httpx2 fork) write to is named.
_HTTP_LOGGERS = [
    f"{library}{suffix}"
    for library, suffixes in (
        ("httpx", ("",)),
        ("httpx2", ("",)),
        ("httpcore", (".connection", ".http11", ".http2", ".proxy", ".socks")),
        ("httpcore2", (".connection", ".http11", ".http2", ".proxy", ".socks")),
    )
    for suffix in suffixes
]


class RedactingFilter(logging.Filter):
    """Rewrites a log record with its URLs and bearer tokens redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _guard_library_logs() -> None:
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


def new_client() -> httpx.Client:
    """An HTTP client that never follows redirects on its own (callers decide where a token may go) and asks
    for identity encoding, so byte offsets in `Range` requests mean what they say."""
    _guard_library_logs()
    return httpx.Client(
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        timeout=TIMEOUT,
        follow_redirects=False,
    )


def server_message(response: httpx.Response) -> str:
    """The human part of an error response (`message`, else `error`, else the text), short and redacted.

    The response must be a streamed one whose body has not been read yet, or a fully read one."""
    if response.is_stream_consumed:
        raw = response.content[:_MAX_ERROR_BODY]
    else:
        raw = b""
        for chunk in response.iter_raw():
            raw += chunk
            if len(raw) >= _MAX_ERROR_BODY:
                break
        raw = raw[:_MAX_ERROR_BODY]
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        parts = [str(document[k]) for k in ("error", "message") if isinstance(document.get(k), str)]
        # civitai sends {"error": "Unauthorized", "message": "The creator ... requires you to be logged in"}.
        text = ": ".join(dict.fromkeys(parts)) if parts else ""
    elif text.startswith("<"):
        text = ""  # an HTML or XML page says nothing a user can act on
    text = " ".join(text.split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 1] + "…"
    return redact(text)


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), if present and sane."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(
    status: int,
    *,
    what: str,
    message: str,
    source: str,
    token_hint: str,
    retry_after: float | None = None,
    secrets: Iterable[str | None] = (),
) -> ModelStoreError:
    """The store error for an HTTP failure `status` while fetching `what` from `source`.

    `message` is the server's own text (already short); `token_hint` names the setting that carries
    credentials (e.g. "CIVITAI_TOKEN")."""
    # The server's text may echo a token back: redacted before it becomes part of an error.
    said = redact(f": {message}", secrets) if message else ""
    what = redact(what, secrets)
    if status == 401:
        error: ModelStoreError = SourceUnauthenticated(
            f"{source} needs credentials to download {what} (set {token_hint}){said}"
        )
    elif status == 403:
        error = SourcePermissionDenied(f"{source} does not allow downloading {what}{said}")
    elif status in (404, 410):
        gone = "no longer available" if status == 410 else "not found"
        error = ModelNotFound(f"{what} is {gone} on {source}{said}")
    elif status == 429:
        wait = f"; retry after {retry_after:.0f} s" if retry_after is not None else ""
        error = SourceRateLimited(
            f"{source} is rate limiting downloads of {what}{wait}{said}", retry_after_s=retry_after
        )
    else:
        error = SourceUnavailable(f"{source} failed with HTTP {status} for {what}{said}")
    return error
