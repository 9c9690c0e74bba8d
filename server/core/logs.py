"""Logging set-up, called by the CLI only: plain lines for people, or one JSON object per line for collectors.

The worker's per-request line carries structured `extra` fields (request_id, outcome, timings, steps_done, and
trace_id / span_id when the request is traced: README "Tracing"); the JSON format keeps them as fields so a log
pipeline need not parse the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_EXTRA_FIELDS = ("request_id", "outcome", "timings", "steps_done", "trace_id", "span_id")
# Client-supplied text in a log line is cut to this many characters (a 32 MiB request id once wrote 32 MiB).
MAX_LOGGED_CHARS = 200


def quoted(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """Client-supplied `text` as it may appear in a log line: quoted with every control character escaped (a
    newline cannot forge a line), and cut to `limit` characters with a note of how long it was."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}...({len(text)} characters)"


def escaped(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text` with every control or invisible formatting character escaped (`\\n`, `\\x1b`, `\\u202e`), cut to
    `limit` characters: for messages that may quote what a client or an upstream server sent."""
    cut = text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in cut)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            # UTC with milliseconds: log pipelines join lines from many replicas in many time zones.
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    """One plain line per record: the message with every control or invisible formatting character escaped
    (`escaped`, uncut), so a name from a request (a local model's path with U+202E in it) cannot reorder or
    hide what a person reads. Tracebacks follow the message as they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escaped(record.message, limit=len(record.message))
        return super().formatMessage(record)


def configure_logging(level: int | str = logging.INFO, *, json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def quiet_model_libraries() -> None:
    """Call before a server starts in this process. diffusers and transformers draw their own progress bars
    and warn about optional backends (torchvision, ...) they do not need here; the server reports progress
    through its events and its own log. (Not part of `configure_logging`: a client-only CLI never imports
    them.)"""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
