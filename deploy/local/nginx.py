"""nginx in front of the local fleet: the config rendered from `deploy/nginx/refinery.conf.template`, run
unprivileged in the foreground as a child process, and its access log read back.

Debian's `nginx-light` is enough (the http2 and grpc modules are built in); `NGINX` names another binary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "nginx" / "refinery.conf.template"
AFFINITY = "hash $refinery_pair_key consistent;"
ROUND_ROBIN = "# round-robin: no hash (the baseline the benchmark compares with)"


class NginxError(RuntimeError):
    """nginx is missing, refused its config, or did not start."""


def nginx_binary() -> str | None:
    """The nginx to run: $NGINX, else `nginx` on PATH or in /usr/sbin (not on a non-root user's PATH); None
    if there is none."""
    explicit = os.environ.get("NGINX")
    if explicit:
        return shutil.which(explicit)
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def render(*, listen: str, servers: Sequence[str], run_dir: Path, affinity: bool = True, workers: str = "1") -> str:
    """The nginx.conf for replicas `servers` ("HOST:PORT", in ring order) behind `listen`."""
    upstreams = "\n        ".join(f"server {s} max_fails=1 fail_timeout=10s;" for s in servers)
    values = {
        "@RUN_DIR@": str(run_dir),
        "@LISTEN@": listen,
        "@SERVERS@": upstreams,
        "@BALANCE@": AFFINITY if affinity else ROUND_ROBIN,
        "@WORKERS@": workers,
    }
    lines = []
    for line in TEMPLATE.read_text().splitlines():
        if not line.lstrip().startswith("#"):  # the template's comments name the placeholders
            for name, value in values.items():
                line = line.replace(name, value)
        lines.append(line)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Call:
    """One line of the access log: a call and the replica(s) nginx sent it to."""

    pair: str
    uri: str
    upstreams: tuple[str, ...]  # in the order tried; the last one answered
    status: str
    grpc_status: str  # as the client saw it ("13": a stream nginx cut; "14": nginx's own 502)
    upstream_statuses: tuple[str, ...] = ()  # what each replica tried answered ("502" for a refused connection)
    attempt: int = 1  # the client's `refinery-attempt` header: 2 and up for a resend

    @property
    def ok(self) -> bool:
        return self.status == "200" and self.grpc_status == "0"


class Nginx:
    """One nginx process on `listen`, its files under `run_dir`."""

    def __init__(
        self, *, listen: str, servers: Sequence[str], run_dir: Path, affinity: bool = True, workers: str = "1"
    ) -> None:
        binary = nginx_binary()
        if binary is None:
            raise NginxError("nginx is not installed (Debian: apt-get install nginx-light)")
        self.binary = binary
        self.listen = listen
        self.run_dir = run_dir
        self.config = run_dir / "nginx.conf"
        self.access_log = run_dir / "access.log"
        self.error_log = run_dir / "error.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            render(listen=listen, servers=servers, run_dir=run_dir, affinity=affinity, workers=workers)
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> None:
        # `-e` moves even the error log nginx opens before reading the config away from root-owned /var/log.
        base = [self.binary, "-c", str(self.config), "-e", str(self.error_log)]
        check = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise NginxError(f"nginx refused {self.config}: {check.stderr.strip()}")
        self._process = subprocess.Popen(
            [*base, "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        host, _, port = self.listen.rpartition(":")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NginxError(f"nginx exited with {self._process.returncode}: {self._tail_error_log()}")
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise NginxError(f"nginx did not listen on {self.listen} within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGQUIT: nginx's graceful stop (finish running calls); SIGKILL if it takes longer than `timeout_s`."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGQUIT)
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def calls(self) -> list[Call]:
        """Every call logged so far (nginx writes a line when a call ends)."""
        if not self.access_log.exists():
            return []
        calls = []
        for line in self.access_log.read_text().splitlines():
            entry = json.loads(line)
            calls.append(
                Call(
                    pair=entry["pair"],
                    uri=entry["uri"],
                    upstreams=tuple(u.strip() for u in entry["upstream"].split(",") if u.strip()),
                    status=entry["status"],
                    grpc_status=entry["grpc_status"],
                    upstream_statuses=tuple(u.strip() for u in entry["upstream_status"].split(",") if u.strip()),
                    attempt=int(entry["attempt"] or 1),
                )
            )
        return calls

    def _tail_error_log(self) -> str:
        try:
            return " | ".join(self.error_log.read_text().splitlines()[-3:])
        except OSError:
            return "(no error log)"
