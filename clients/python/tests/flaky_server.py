"""Servers that fail the first calls in a chosen way, then answer: what the client's resend is tested against.

`FlakyGeneration` is a real gRPC server on loopback whose `Generate` ends the first `failures` calls with a
status (optionally after one response), then streams a queued event and an image. `ResettingFront` stands in
front of it as a TCP listener: its first `resets` connections get what nginx sends when a replica dies under
a call (response headers, then RST_STREAM INTERNAL_ERROR, then GOAWAY), spoken as raw HTTP/2 frames; later
connections are piped through to the server. No grpc internals are replaced.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class Seen:
    request: pb.GenerateRequest
    metadata: dict[str, str]


@dataclass
class FlakyGeneration(pb_grpc.GenerationServiceServicer):
    failures: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    details: str = "the server is shutting down"
    answer_first: bool = False  # send a queued event before failing
    hold: threading.Event | None = None  # failing calls wait for this first (to close the client meanwhile)
    calls: list[Seen] = field(default_factory=list)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self.calls.append(Seen(request, {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}))
        rid = request.request_id or "server-assigned"
        if len(self.calls) <= self.failures:
            if self.answer_first:
                yield pb.GenerateResponse(request_id=rid, queued=pb.Queued(position=0, queue_depth=1))
            if self.hold is not None:
                self.hold.wait(30)
            context.abort(self.code, self.details)
        yield pb.GenerateResponse(request_id=rid, queued=pb.Queued(position=0, queue_depth=1))
        image = pb.Image(index=0, data=b"png", mime_type="image/png", width=64, height=64, seed=7, base_steps=4)
        yield pb.GenerateResponse(request_id=rid, image=image)


def serve(service: FlakyGeneration) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GenerationServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


# HTTP/2 (RFC 9113) frame types and the bits of it a reset needs.
_HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0x1, 0x3, 0x4, 0x7
_END_HEADERS, _ACK = 0x4, 0x1
_INTERNAL_ERROR = 0x2
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# HPACK: ":status: 200" (static table index 8), then "content-type: application/grpc" (literal, name index 31).
_GRPC_RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class ResettingFront:
    """A TCP front whose first `resets` connections reset the first call's stream as nginx does when the
    replica behind it dies after the response headers passed; the rest are piped to `backend`."""

    def __init__(self, backend: str, resets: int) -> None:
        self.backend = backend
        self.resets = resets
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            handler = self._reset if self.connections <= self.resets else self._pipe
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def _reset(self, conn: socket.socket) -> None:
        with conn:
            try:
                _read(conn, len(_PREFACE))
                conn.sendall(_frame(_SETTINGS, 0, 0))
                while True:
                    header = _read(conn, 9)
                    kind, flags = header[3], header[4]
                    stream = int.from_bytes(header[5:], "big") & 0x7FFFFFFF
                    _read(conn, int.from_bytes(header[:3], "big"))
                    if kind == _SETTINGS and not flags & _ACK:
                        conn.sendall(_frame(_SETTINGS, _ACK, 0))
                    elif kind == _HEADERS:
                        conn.sendall(_frame(_HEADERS, _END_HEADERS, stream, _GRPC_RESPONSE_HEADERS))
                        conn.sendall(_frame(_RST_STREAM, 0, stream, struct.pack(">I", _INTERNAL_ERROR)))
                        conn.sendall(_frame(_GOAWAY, 0, 0, struct.pack(">II", stream, 0)))
                        # Read on until the client hangs up: closing with its bytes unread would send a TCP
                        # reset, and a reset can drop the frames above before the client reads them.
                        conn.settimeout(10)
                        while conn.recv(65536):
                            pass
                        return
            except (ConnectionError, OSError):
                return

    def _pipe(self, conn: socket.socket) -> None:
        host, _, port = self.backend.rpartition(":")
        upstream = socket.create_connection((host, int(port)))

        def copy(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for s in (source, sink):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=copy, args=(upstream, conn), daemon=True)
        back.start()
        with conn, upstream:
            copy(conn, upstream)
            back.join(10)
