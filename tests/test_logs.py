"""`--log-json`: one JSON object per line, with the per-request fields kept as fields."""

from __future__ import annotations

import json
import logging
import sys

from server.core.logs import JsonFormatter


def test_json_lines_keep_the_request_fields() -> None:
    record = logging.LogRecord("server.worker", logging.INFO, __file__, 1, "request %s %s", ("r1", "ok"), None)
    record.request_id = "r1"
    record.outcome = "ok"
    record.timings = {"queued_s": 0.0, "base_s": 0.25}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "request r1 ok"
    assert entry["level"] == "INFO" and entry["logger"] == "server.worker"
    assert (entry["request_id"], entry["outcome"], entry["timings"]["base_s"]) == ("r1", "ok", 0.25)


def test_json_lines_carry_tracebacks() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "RuntimeError: boom" in entry["exception"]
    assert "\n" not in JsonFormatter().format(record)  # still one line
