"""`refinery serve` in its own process for the GPU benchmarks, called over loopback gRPC like any client, with
the server's own view beside each figure: its per-request timings (from its JSON log), its device's busy time
and compiled shapes (GetStatus)."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from refinery.v1 import models_pb2, models_pb2_grpc, status_pb2, status_pb2_grpc

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, highly detailed"
SEED = 1234
STAGES = ("queued_s", "loading_s", "base_s", "refiner_s", "decode_s", "encode_s")
ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Service:
    """One server process. `ready_s`: process start to SERVING (the readiness health check)."""

    def __init__(self, folders: dict[str, Path], device: str, cache: Path, flags: Sequence[str]) -> None:
        port = free_port()
        self.pair = f"local:{folders['A']}+local:{folders['R']}"
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--devices", device, "--model", f"local:{folders['A']}", "--refiner", f"local:{folders['R']}"]
        command += ["--cache-dir", str(cache), "--log-level", "INFO", "--log-json", *flags]
        cache.mkdir(parents=True, exist_ok=True)
        self.log_path = cache / f"serve-{port}.log"
        self._log_offset = 0
        started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 2**26)])
        self.stub = pb_grpc.GenerationServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.status_stub = status_pb2_grpc.ServerServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.models_stub = models_pb2_grpc.ModelServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self._wait_serving()
        self.ready_s = time.perf_counter() - started

    def _wait_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service="refinery.v1.GenerationService")
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"refinery serve exited:\n{self.log_tail()}")
            try:
                if health.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)

    def generate(self, size: int, steps: int, *, n: int = 1, cfg: float = 7.0, model: str = "") -> float:
        """Seconds for one Generate (every image received), the refiner from 90 % unless `model` is a base alone."""
        request = pb.GenerateRequest(
            positive_prompt=PROMPT, model=model, width=size, height=size, steps=steps, seed=SEED, number_results=n,
            cfg_scale=cfg,
        )  # fmt: skip
        if not model:
            request.refiner.CopyFrom(pb.Refiner(start_step_percentage=90))
        started = time.perf_counter()
        try:
            images = sum(r.WhichOneof("event") == "image" for r in self.stub.Generate(request, timeout=900))
        except grpc.RpcError as error:  # INTERNAL hides the cause from clients; the server's log has it
            raise RuntimeError(f"Generate failed: {error}; the server's log ends:\n{self.log_tail()}") from error
        assert images == n, f"expected {n} images, got {images}"
        return time.perf_counter() - started

    def burst(self, size: int, steps: int, count: int) -> float:
        """Wall seconds for `count` one-image requests sent at once. Each has a guidance scale of its own, so no
        two share a batch (each runs alone, as with --max-batch 1) while the work stays the same."""
        started = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda i: self.generate(size, steps, cfg=7 + i / 100), range(count)))
        return time.perf_counter() - started

    def sequential(self, size: int, steps: int, count: int) -> float:
        """The same `count` requests as `burst`, one after another."""
        started = time.perf_counter()
        for i in range(count):
            self.generate(size, steps, cfg=7 + i / 100)
        return time.perf_counter() - started

    def log_tail(self, size: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]

    def timings(self) -> list[dict[str, float]]:
        """The server's own timings of the requests that ended since the last call (whole lines only)."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]
        self._log_offset += len(data)
        found = []
        for line in data.decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "timings" in entry:
                found.append(dict(entry["timings"]))
        return found

    def device(self) -> Any:
        return self.status_stub.GetStatus(status_pb2.GetStatusRequest(), timeout=30).devices[0]

    def busy_s(self) -> float:
        return float(self.device().busy_time.ToNanoseconds()) / 1e9

    def wait_compiled(self, deadline: float) -> dict[str, Any]:
        """Until every compiled shape is ready or failed, or `deadline` (time.monotonic()); what became of each."""
        while True:
            shapes = list(self.device().compiled_shapes)
            done = shapes and all(s.state in (s.STATE_READY, s.STATE_FAILED) for s in shapes)
            if done or time.monotonic() > deadline:
                return {
                    f"{s.model.rsplit('/', 1)[-1]} {s.width}x{s.height}": {
                        "state": status_pb2.CompiledShape.State.Name(s.state),
                        "compile_s": s.compile_time.ToNanoseconds() / 1e9,
                        "error": s.error[:300],
                    }
                    for s in shapes
                }
            time.sleep(0.5)

    def pull(self, model: str) -> float:
        started = time.perf_counter()
        for _ in self.models_stub.PullModel(models_pb2.PullModelRequest(model=model), timeout=900):
            pass
        return time.perf_counter() - started

    def close(self) -> None:
        self.channel.close()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def median_timings(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r.get(key, 0.0) for r in rows), 4) for key in STAGES} if rows else {}
