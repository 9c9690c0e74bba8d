"""A real HTTP/1.1 server on 127.0.0.1:<free port>, in a thread, that records every request it gets."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self.server.owner._dispatch(self, "GET")

    def do_HEAD(self) -> None:
        self.server.owner._dispatch(self, "HEAD")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the request log is in FakeServer.requests

    # --- helpers for fakes ---

    def send_json(self, status: int, document: object, headers: dict[str, str] | None = None) -> None:
        self.send_body(status, json.dumps(document).encode(), {"Content-Type": "application/json", **(headers or {})})

    def send_body(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def cut(self) -> None:
        """Drop the connection now, mid-body: the client sees a truncated transfer."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FakeServer


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._log_lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def seen(self, method: str | None = None, prefix: str = "") -> list[Seen]:
        with self._log_lock:
            return [r for r in self.requests if (method is None or r.method == method) and r.path.startswith(prefix)]

    def _dispatch(self, handler: Handler, method: str) -> None:
        parts = urlsplit(handler.path)
        seen = Seen(
            method,
            parts.path,
            dict(parse_qsl(parts.query, keep_blank_values=True)),
            {k.lower(): v for k, v in handler.headers.items()},
        )
        with self._log_lock:
            self.requests.append(seen)
        self.handle(handler, seen)

    def handle(self, handler: Handler, request: Seen) -> None:
        raise NotImplementedError


def serve_range(
    handler: Handler,
    data: bytes,
    headers: dict[str, str],
    *,
    ignore_range: bool = False,
    cut_at: int | None = None,
    before_chunk: Any = None,
    chunk: int = 64 * 1024,
) -> None:
    """Serve `data` honouring `Range: bytes=N-` (206), as S3-style storage does.

    `cut_at`: drop the connection once this absolute offset is reached. `before_chunk(offset)` runs before
    each chunk is written (to trickle or to block)."""
    total = len(data)
    start = 0
    range_header = handler.headers.get("Range")
    status = 200
    if range_header and not ignore_range:
        start = int(range_header.removeprefix("bytes=").split("-")[0])
        if start >= total:
            handler.send_body(416, b"", {"Content-Range": f"bytes */{total}"})
            return
        status = 206
        headers = {**headers, "Content-Range": f"bytes {start}-{total - 1}/{total}"}
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Accept-Ranges", "bytes")
    handler.send_header("Content-Length", str(total - start))
    handler.end_headers()
    if handler.command == "HEAD":
        return
    offset = start
    try:
        while offset < total:
            if cut_at is not None and offset >= cut_at:
                handler.cut()
                return
            end = min(total, offset + chunk)
            if cut_at is not None and offset < cut_at:
                end = min(end, cut_at)
            if before_chunk is not None:
                before_chunk(offset)
            handler.wfile.write(data[offset:end])
            offset = end
    except (BrokenPipeError, ConnectionResetError):
        handler.close_connection = True
