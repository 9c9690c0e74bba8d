"""One `refinery serve` replica of the local fleet: a child process on loopback with its gRPC and metrics ports,
configured by flags (and REFINERY_* for what has no flag), and read back through health and /metrics.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

READINESS_SERVICE = "refinery.v1.GenerationService"


class ReplicaError(RuntimeError):
    """A replica exited or did not become ready."""


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    host: str
    port: int
    metrics_port: int
    cache_dir: Path
    log_path: Path
    budget: str = "0"  # "0": the server's default (RAM less 25 %)
    grace_s: float = 30.0
    max_batch: int = 4
    env: Mapping[str, str] = field(default_factory=dict)
    # Shared model cache (issue 20): "BASE[+REFINER]" pairs to pin ("none": nothing resident at start), the
    # cache mounted read-only, and a command prefix that runs the server (deploy/local/read_only.py).
    pins: str = "none"
    cache_read_only: bool = False
    prefix: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _refinery_command() -> list[str]:
    """`refinery` from this interpreter's environment (the venv the fleet runs in)."""
    script = Path(sys.executable).with_name("refinery")
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


class Replica:
    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def pid(self) -> int:
        if self._process is None:
            raise ReplicaError(f"{self.spec.name} is not started")
        return self._process.pid

    def start(self) -> None:
        spec = self.spec
        command = [
            *spec.prefix,
            *_refinery_command(),
            "serve",
            "--host", spec.host,
            "--port", str(spec.port),
            "--metrics-port", str(spec.metrics_port),
            "--devices", "cpu",
            "--pin", spec.pins,  # default none: the balancer, not a pin, decides who holds a pair
            "--budget", spec.budget,
            "--grace", str(spec.grace_s),
            "--max-batch", str(spec.max_batch),
            "--cache-dir", str(spec.cache_dir),
            *(["--cache-read-only"] if spec.cache_read_only else []),
        ]  # fmt: skip
        env = {**os.environ, **spec.env}
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:
            # Own session: a Ctrl-C in the fleet's terminal reaches the fleet, which then stops replicas in order.
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until readiness (`refinery.v1.GenerationService`) says SERVING, as a Kubernetes probe would ask."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.running():
                    raise ReplicaError(f"{self.spec.name} exited: {self.log_tail()}")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=READINESS_SERVICE), timeout=2)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.2)
        raise ReplicaError(f"{self.spec.name} not ready within {timeout_s:.0f}s: {self.log_tail()}")

    def wait_port_closed(self, timeout_s: float = 60.0) -> None:
        """Until the gRPC port refuses connections: the server has stopped accepting (it drains, or is gone)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.spec.host, self.spec.port), timeout=1).close()
            except ConnectionRefusedError:
                return
            except OSError:
                pass
            time.sleep(0.01)
        raise ReplicaError(f"{self.spec.name} still accepts connections after {timeout_s:.0f}s")

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the replica vanishes mid-work, as when a node dies or the OOM killer strikes."""
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
            self.wait()

    def terminate(self) -> None:
        """SIGTERM: the replica drains (running calls finish within its grace period), then exits."""
        if self.running():
            os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout_s: float | None = None) -> int:
        if self._process is None:
            raise ReplicaError(f"{self.spec.name} is not started")
        return self._process.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout_s`."""
        if not self.running():
            return
        self.terminate()
        try:
            self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def _scrape(self) -> str:
        url = f"http://{self.spec.host}:{self.spec.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def metrics(self) -> dict[str, float]:
        """This replica's /metrics, as {"name{label=value,...}": value} (labels sorted)."""
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(self._scrape()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def metric_names(self) -> set[str]:
        """Every series name this replica declares, also those with no sample yet (a labelled histogram before
        its first observation): what a query may name."""
        suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "summary": ("_count", "_sum")}
        names: set[str] = set()
        for family in text_string_to_metric_families(self._scrape()):
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
        return names

    def total(self, name: str) -> float:
        """The sum of a metric's samples over all label values (0 when it has none yet)."""
        return sum(v for key, v in self.metrics().items() if key.partition("{")[0] == name)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.spec.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
