"""A loopback civitai stand-in for benchmarks: the two API routes and a storage route serving one file from
disk with `sendfile` and Range support, in a process of its own so it does not share the client's GIL."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import struct
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def write_checkpoint(path: Path, size: int) -> str:
    """A safetensors file of about `size` bytes (one uint8 tensor of random bytes); returns its sha256."""
    header = json.dumps({"weight": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for block in (struct.pack("<Q", len(header)), header):
            f.write(block)
            digest.update(block)
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 16 << 20))
            f.write(block)
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path: Path = self.server.file
        size = path.stat().st_size
        if self.path.startswith("/api/v1/model-versions/"):
            body = json.dumps(
                {
                    "id": 2,
                    "modelId": 1,
                    "model": {"type": "Checkpoint"},
                    "files": [
                        {
                            "id": 3,
                            "type": "Model",
                            "sizeKB": size / 1024,
                            "metadata": {"format": "SafeTensor"},
                            "hashes": {"SHA256": self.server.sha256.upper()},
                        }
                    ],
                }
            ).encode()
            self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
            self.wfile.write(body)
        elif self.path.startswith("/api/download/models/"):
            self._send(307, {"Location": "/file?X-Amz-Signature=benchmark", "Content-Length": "0"})
        else:
            start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size - start)}
            if start:
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            self._send(206 if start else 200, headers)
            with path.open("rb") as f:
                self.wfile.flush()
                self.connection.sendfile(f, offset=start)

    def _send(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()


def _serve(file: Path, sha256: str, sock: socket.socket) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.file = file  # type: ignore[attr-defined]
    server.sha256 = sha256  # type: ignore[attr-defined]
    server.serve_forever()


class LoopbackServer:
    def __init__(self, file: Path, sha256: str) -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        context = multiprocessing.get_context("fork")
        self._process = context.Process(target=_serve, args=(file, sha256, sock), daemon=True)
        self._process.start()
        sock.close()

    def close(self) -> None:
        self._process.terminate()
        self._process.join()
