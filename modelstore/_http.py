"""HTTP plumbing shared by the civitai source and the downloader: GETs that never hand a token to another host,
the errors that mean "the connection failed" rather than "the server said no", and one table that turns an HTTP
status into a `modelstore.errors` class (huggingface_hub's `hf_raise_for_status`, for our sources).

The client is a `requests.Session` (the project's HTTP client; diffusers installs it anyway), given by the
caller or made by `ModelStore`. Nothing here changes the session: what every request needs (timeouts, headers,
no automatic redirects, no `~/.netrc`) is passed with each request, so an injected session behaves the same,
and the threads that share it only send requests through it (urllib3's connection pools, which do the work,
are thread-safe). Bodies are read from `Response.raw` as they arrive (`receive`), the way the downloader needs:
no re-chunking, so whatever arrived before a connection drops is kept.
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.auth import AuthBase

from modelstore._redact import for_log, redact, summarise
from modelstore.errors import (
    ModelNotFound,
    ModelStoreError,
    SourcePermissionDenied,
    SourceRateLimited,
    SourceUnauthenticated,
    SourceUnavailable,
)

# A descriptive non-browser agent: civitai's WAF refuses library defaults, and a browser agent switches its
# download endpoint into "redirect to the login page" mode (modelstore.md §2.3). Identity encoding, so byte
# offsets in `Range` requests mean what they say.
_HEADERS = {"User-Agent": "refinery-modelstore/0.1 (+https://github.com/refinery)", "Accept-Encoding": "identity"}
# (connect, read) seconds. Long transfers are normal on a slow link; what matters is that bytes keep arriving,
# and requests' read timeout is exactly that: the longest wait for the next bytes.
_TIMEOUT = (15.0, 60.0)
_MAX_REDIRECTS = 10
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Error bodies are read only this far: they are messages, never models.
_MAX_ERROR_BODY = 16 * 1024
MAX_MESSAGE = 200  # an upstream error's own words, summarised


class BrokenTransfer(Exception):
    """The server broke the transfer in a way another attempt may mend: a body cut short, a range it was not
    asked for, a redirect loop."""


# The connection failed rather than the server refusing: requests' errors while connecting and waiting for the
# headers, urllib3's while the body is read from `Response.raw` (cut short, stalled), and ours.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    urllib3.exceptions.HTTPError,
    BrokenTransfer,
)

_LIBRARY_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)

# The HTTP libraries log every request's URL (urllib3 at DEBUG; httpx, which huggingface_hub uses, at INFO) and
# httpcore every response's headers (Location included); a presigned storage URL is a credential (modelstore.md
# §4.3). Logger filters are not inherited, so each logger these libraries (and huggingface_hub's httpx2 fork)
# write to is named.
_HTTP_LOGGERS = [
    *(
        f"urllib3.{module}"
        for module in ("connectionpool", "connection", "poolmanager", "response", "util.retry", "http2.connection")
    ),
    "httpx",
    "httpx2",
    *(
        f"{library}.{module}"
        for library in ("httpcore", "httpcore2")
        for module in ("connection", "http11", "http2", "proxy", "socks")
    ),
]


class RedactingFilter(logging.Filter):
    """Rewrites a log record with every query string dropped, bearer tokens hidden, and the secrets the stores
    of this process were given removed in any shape (`_redact.for_log`)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: frozenset[str] = frozenset()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = for_log(message, self.secrets)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def guard_library_logs(secrets: Iterable[str | None] = ()) -> None:
    """Make the HTTP libraries' own log lines safe to keep (idempotent; `secrets` add to those already known)."""
    known = frozenset(s for s in secrets if s)
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        guard = next((f for f in logger.filters if isinstance(f, RedactingFilter)), None)
        if guard is None:
            guard = RedactingFilter()
            logger.addFilter(guard)
        guard.secrets |= known


class _HeadersOnly(AuthBase):
    """Credentials come only from the headers a caller sets. Passing an auth object stops requests from adding
    `~/.netrc`'s for the host: httpx never read that file, and an entry there would replace a bearer token, or
    reach presigned storage that refuses any Authorization."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return request


_NO_NETRC = _HeadersOnly()


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of `url`, the default port made explicit: what may share a token."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or _DEFAULT_PORTS.get(scheme)


def get(
    session: requests.Session, url: str, headers: Mapping[str, str], *, follow_redirects: bool = False
) -> requests.Response:
    """A streamed GET (the body is the caller's to read, or not, and the response to close).

    Redirects are followed here, not by requests, and only when asked: the caller's `Authorization` goes to
    the origin it was given for and is dropped for good at the first hop to another one (storage must not see
    a token, and R2/B2 refuse presigned requests that carry one). Raises TRANSPORT_ERRORS."""
    sent = {**_HEADERS, **headers}
    for _ in range(_MAX_REDIRECTS + 1):
        response = session.get(url, headers=sent, stream=True, timeout=_TIMEOUT, allow_redirects=False, auth=_NO_NETRC)
        if not (follow_redirects and response.is_redirect):
            return response
        response.close()
        target = urljoin(url, response.headers["Location"])
        if origin(target) != origin(url):
            sent = {name: value for name, value in sent.items() if name.lower() != "authorization"}
        url = target
    raise BrokenTransfer(f"more than {_MAX_REDIRECTS} redirects")


class _Tally:
    """Bytes received from model sources by this process, for operators' metrics (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._total += nbytes

    @property
    def total(self) -> int:
        with self._lock:
            return self._total


RECEIVED = _Tally()


def receive(response: requests.Response, chunk: int) -> Iterator[bytes]:
    """The body as it arrives: each piece as soon as the socket has it (at most `chunk` bytes), never held back
    to fill a chunk, so what arrived before a drop is in the caller's hands. Raises TRANSPORT_ERRORS, and
    urllib3 raises for a body shorter than its Content-Length."""
    # We ask for identity; a server that encodes anyway is decoded (as httpx did), but only then: urllib3's
    # decoding path copies every chunk once more.
    decode = response.headers.get("Content-Encoding", "identity").strip().lower() != "identity"
    while data := response.raw.read1(chunk, decode_content=decode):
        RECEIVED.add(len(data))
        yield data


def read_capped(response: requests.Response, limit: int) -> bytes:
    """At most `limit` bytes of an unread streamed body."""
    data: bytes = response.raw.read(limit, decode_content=True)
    return data


def server_message(response: requests.Response) -> str:
    """The human part of an unread error response (`message`, else `error`, else the text), from at most its
    first 16 KiB, as the server wrote it: `error_for_status` makes it one short redacted line."""
    text = read_capped(response, _MAX_ERROR_BODY).decode("utf-8", errors="replace").strip()
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
    return text


def describe(exc: BaseException, secrets: Iterable[str | None] = ()) -> str:
    """What went wrong with a connection, for a log line or an error: the innermost cause ("[Errno 111]
    Connection refused", "timed out"), in one redacted line. requests and urllib3 wrap it in layers that
    repeat the host and the URL, query and all."""
    cause = exc
    seen = {id(cause)}
    while isinstance(cause, _LIBRARY_ERRORS):  # anything else says what it means itself
        reason = getattr(cause, "reason", None)  # urllib3's MaxRetryError keeps the error that happened here
        inner = reason if isinstance(reason, BaseException) else cause.__cause__ or cause.__context__
        if inner is None or id(inner) in seen:
            break
        cause = inner
        seen.add(id(cause))
    text = str(cause).strip()
    return for_log(text.splitlines()[0] if text else cause.__class__.__name__, secrets)


def retry_after_s(response: requests.Response) -> float | None:
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

    `message` is the server's own text, as it came; `token_hint` names the setting that carries credentials
    (e.g. "CIVITAI_TOKEN")."""
    # The server's text may echo a token back: redacted (here, and only here) before it becomes part of an error.
    said = f": {summarise(message, MAX_MESSAGE, secrets)}" if message.strip() else ""
    what = redact(what, secrets)
    if status == 401:
        return SourceUnauthenticated(f"{source} needs credentials to download {what} (set {token_hint}){said}")
    if status == 403:
        return SourcePermissionDenied(f"{source} does not allow downloading {what}{said}")
    if status in (404, 410):
        gone = "no longer available" if status == 410 else "not found"
        return ModelNotFound(f"{what} is {gone} on {source}{said}")
    if status == 429:
        wait = f"; retry after {retry_after:.0f} s" if retry_after is not None else ""
        return SourceRateLimited(
            f"{source} is rate limiting downloads of {what}{wait}{said}", retry_after_s=retry_after
        )
    return SourceUnavailable(f"{source} failed with HTTP {status} for {what}{said}")


def response_error(
    response: requests.Response, *, what: str, source: str, token_hint: str, secrets: Iterable[str | None] = ()
) -> ModelStoreError:
    """`error_for_status` for an unread error response, with the server's own words and `Retry-After`."""
    return error_for_status(
        response.status_code,
        what=what,
        message=server_message(response),
        source=source,
        token_hint=token_hint,
        retry_after=retry_after_s(response),
        secrets=secrets,
    )
