"""A tiny HTTP server for one GET path (`/metrics`), whose cost stays bounded whatever its clients do.

http.server's ThreadingHTTPServer spends a thread on every open connection, idle ones included: 2,000 idle
connections to the metrics port held 2,017 threads (issue 21, item 10). Here one thread runs an asyncio loop and
each connection is a coroutine on it:

- a connection has `HEAD_TIMEOUT_S` to send its request line and headers (at most `HEAD_LIMIT` bytes) and
  `WRITE_TIMEOUT_S` to take the answer; it is then closed (one request per connection, `Connection: close`);
- at most `MAX_CONNECTIONS` are open (file descriptors are shared with the gRPC port); one more closes the
  oldest connection that has not sent its request yet, so idle connections cannot lock a scraper out.

Anything but GET or HEAD is 405; any other path is 404 (a health check must not mistake it for one).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable

HEAD_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 30.0
HEAD_LIMIT = 16 * 1024
MAX_CONNECTIONS = 64

Render = Callable[[], tuple[bytes, str]]  # the body and its Content-Type


class HttpEndpoint:
    """Serves `render()` at `path` on `host:port` (0: a free port, then `.port`) from a thread of its own until
    `close()`. Binding happens here, so a taken port raises OSError in the caller."""

    def __init__(self, host: str, port: int, path: str, render: Render, *, max_connections: int = MAX_CONNECTIONS):
        bare = host.strip("[]")
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        self._socket = socket.create_server((bare, port), family=family)
        self.port: int = self._socket.getsockname()[1]
        self._path = path
        self._render = render
        self._max = max_connections
        self._open: dict[asyncio.StreamWriter, bool] = {}  # in order of arrival; True once its request is in
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="refinery-metrics", daemon=True)
        self._thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, sock=self._socket, limit=HEAD_LIMIT)
        )
        started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def close(self) -> None:
        """Stop listening, close every connection, end the thread."""
        if self._loop.is_closed() or self._server is None:
            return
        server = self._server

        async def shut() -> None:
            server.close()
            for writer in list(self._open):
                writer.transport.abort()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2.0)
            self._loop.stop()

        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(shut()))
        self._thread.join(10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self._max:
            idle = next((w for w, asked in self._open.items() if not asked), None)
            if idle is None:  # every one is being answered: this one waits for nothing
                writer.transport.abort()
                return
            idle.transport.abort()
            self._open.pop(idle, None)
        self._open[writer] = False
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            self._open[writer] = True
            writer.write(self._answer(head))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # slow, gone, or not HTTP: closed below, nothing to log
        finally:
            self._open.pop(writer, None)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.decode("latin-1").partition(" ")
        target = rest.partition(" ")[0]
        if method not in ("GET", "HEAD"):
            return _response(405, b"only GET is served here\n", "text/plain; charset=utf-8", extra="Allow: GET\r\n")
        if target.split("?", 1)[0] != self._path:
            body = f"only {self._path} is served here\n".encode()
            return _response(404, body, "text/plain; charset=utf-8", head_only=method == "HEAD")
        body, content_type = self._render()
        return _response(200, body, content_type, head_only=method == "HEAD")


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}


def _response(status: int, body: bytes, content_type: str, *, extra: str = "", head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)
