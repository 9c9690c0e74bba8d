"""What tracing costs a request: `Generate` end to end with OpenTelemetry on (exporting over OTLP/gRPC to a
receiver on loopback) against off, two `refinery serve` processes side by side, called in turn.

    python benchmarks/bench_tracing.py            # the tiny built-in pair, 64x64, 20 steps, refiner at 90 %
    python benchmarks/bench_tracing.py --reps 60 --size 128
    python benchmarks/bench_tracing.py --quick    # 4 steps, two runs each: a check that it runs

Both servers get the same flags and environment but for the `OTEL_*` settings (on: an OTLP endpoint, the
default batch processor; off: none, so OpenTelemetry is never imported). Calls alternate (off, on, off, ...)
after a warm-up, so drift in machine load hits both alike; only one server works at a time. The receiver is a
real OTLP `TraceService` (the OTLP protos' generated servicer) that counts what it is sent, so the figure
includes the export, on the server's own background thread, as a collector would take it.

A machine shared with other work moves single calls by tens of percent, so besides the ratio of the medians
it prints the median of the paired ratios (each "on" call against the "off" call next to it), and the
recording itself measured in-process (`--record-reps` times, with the same exporter and receiver): what a
request's span tree costs the server's CPU when the request ends, and what a request costs with tracing off.

Target: median on / median off <= 1.02.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from benchmarks._service import free_port
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback that counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(1))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        count = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()

    def close(self) -> None:
        self._server.stop(0)


class Server:
    """`refinery serve` in its own process, the default pair preloaded."""

    def __init__(self, args: argparse.Namespace, otel: dict[str, str]) -> None:
        port = free_port()
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--devices", args.device, "--log-level", "WARNING", "--max-batch", "1"]
        if args.cache_dir:
            command += ["--cache-dir", str(args.cache_dir)]
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self._process = subprocess.Popen(command, cwd=ROOT, env={**env, **otel})
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self._channel).result(timeout=300)
        watch = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service="refinery.v1.GenerationService"), timeout=300
        )
        for update in watch:  # the default pair is resident once this says SERVING
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                break
        watch.cancel()
        self._stub = pb_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def generate(self, args: argparse.Namespace, seed: int) -> float:
        """Seconds from the call to its last message (the PNG)."""
        request = pb.GenerateRequest(
            positive_prompt=PROMPT,
            width=args.size,
            height=args.size,
            steps=args.steps,
            seed=seed,
            refiner=pb.Refiner(start_step_percentage=args.refiner_start),
        )
        started = time.perf_counter()
        for _ in self._stub.Generate(request, timeout=300):
            pass
        return time.perf_counter() - started

    def close(self) -> None:
        self._channel.close()
        self._process.terminate()
        self._process.wait(timeout=120)


def recording_cost(port: int, reps: int) -> tuple[float, float]:
    """Microseconds per request: recording its spans with tracing on (start, ten children, end), and the
    whole of what tracing does with it off (reading the caller's traceparent for the log line)."""
    from modelstore import parse_air
    from server.core.domain import ImageFormat, Job, RefinerSpec, Sampler
    from server.core.settings import DEFAULT_BASE, DEFAULT_REFINER
    from server.core.tracing import Tracer
    from server.generation import StageTimings
    from server.generation.split import StartPercentage
    from server.scheduling import start_trace
    from server.scheduling.ticket import Ticket

    os.environ.update(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    )
    # Thousands of requests in a tight loop: a queue large enough that the SDK keeps them all (it drops spans
    # beyond its queue, 2048 by default, rather than make a request wait).
    # Never below the SDK's export batch (512), which it refuses (as in --quick's few requests).
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(max(reps * 12, 2048))
    tracer = Tracer.from_environment("otlp")
    refiner = RefinerSpec(parse_air(DEFAULT_REFINER), StartPercentage(90))
    job = Job(
        request_id="bench", model=parse_air(DEFAULT_BASE), refiner=refiner, prompt=PROMPT, negative_prompt=None,
        width=64, height=64, steps=20, base_steps=18, cfg_scale=7.0, seed=1, sampler=Sampler.EULER,
        number_results=1, output_format=ImageFormat.PNG, preview_every=0,
    )  # fmt: skip
    metadata = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}

    def one(traced: bool) -> float:
        ticket = Ticket(job, None, leases=None, deadline=None)  # type: ignore[arg-type]
        t = ticket.timings
        t.resolving, t.resolved, t.started, t.loading_s = t.submitted, t.submitted, t.submitted, 0.001
        t.run_started, t.run_ended, t.delivering, t.encode_s = t.submitted, t.submitted + 0.3, t.submitted + 0.3, 0.01
        t.run = StageTimings(base_s=0.2, refiner_s=0.05, decode_s=0.05)
        ticket.batch = (ticket,)
        started = time.perf_counter()  # what tracing does for a request: from the call's arrival to its end
        trace = ticket.trace = start_trace(tracer if traced else None, metadata)
        if trace is not None:
            trace.log_fields()
            trace.end(ticket, "ok", None)
        return time.perf_counter() - started

    on = statistics.median(one(True) for _ in range(reps))
    off = statistics.median(one(False) for _ in range(reps))
    tracer.shutdown()
    return on * 1e6, off * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40, help="timed runs of each server (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each first (default 3)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--refiner-start", type=int, default=90, help="percent (default 90)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: REFINERY_CACHE_DIR, ~/.cache)")
    parser.add_argument("--record-reps", type=int, default=2000, help="in-process recordings (default 2000)")
    args = parse_args(parser, {"reps": 2, "warmup": 1, "steps": 4, "record_reps": 20})

    receiver = Receiver()
    on_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    servers = {"off": Server(args, {}), "on": Server(args, on_env)}
    seconds: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for rep in range(args.warmup + args.reps):
            for name, server in servers.items():  # off, on, off, on, ...
                took = server.generate(args, seed=rep)
                if rep >= args.warmup:
                    seconds[name].append(took)
    finally:
        for server in servers.values():
            server.close()  # the traced one flushes its last spans to the receiver as it stops
    received = receiver.spans
    record_on_us, record_off_us = recording_cost(receiver.port, args.record_reps)
    receiver.close()

    def row(name: str, values: list[float]) -> str:
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        median = statistics.median(values)
        return f"{name:<40} {median * 1000:>9.1f} {ordered[0] * 1000:>9.1f} {p90 * 1000:>9.1f}"

    requests = args.warmup + args.reps
    print(
        f"{args.size}x{args.size}, {args.steps} steps, refiner at {args.refiner_start} %, device {args.device}; "
        f"{args.reps} interleaved runs each after {args.warmup} warm-up"
    )
    print(f"{'':<40} {'median ms':>9} {'min ms':>9} {'p90 ms':>9}")
    print(row("tracing off (no OTEL_* set)", seconds["off"]))
    print(row("tracing on (OTLP/gRPC to loopback)", seconds["on"]))
    ratio = statistics.median(seconds["on"]) / statistics.median(seconds["off"])
    paired = statistics.median(on / off for on, off in zip(seconds["on"], seconds["off"], strict=True))
    print(f"ratio on/off: {ratio:.3f} (medians), {paired:.3f} (median of paired calls)  (target <= 1.02)")
    print(f"spans received: {received} for {requests} requests ({received / requests:.1f} per request)")
    print(
        f"in-process, per request (median of {args.record_reps}): recording its spans {record_on_us:.0f} us "
        f"with tracing on; {record_off_us:.1f} us with it off (the caller's traceparent read for the log line)"
    )


if __name__ == "__main__":
    main()
