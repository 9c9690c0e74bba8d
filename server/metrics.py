"""Prometheus metrics for operators (deploy/grafana has a dashboard of them).

- Calls: `refinery_requests_total{method, code}` for every RPC by its gRPC status, refused ones included
  (counted where calls enter, `server/api/access.py`).
- Generate requests: outcomes (`refinery_jobs_total{outcome}`: ok, cancelled, deadline_exceeded, rejected,
  failed, where a request whose images its client did not take is failed), end-to-end latency
  (`refinery_request_seconds`), time to the first denoising step (`refinery_first_step_seconds`), time queued,
  step time, images delivered, batch sizes.
- Devices: model loads and evictions (how often pairs move: the "is the fleet thrashing?" signal), budgets.
- State read at scrape time from the scheduler's snapshot (`watch`), so it never drifts: queue depth per
  priority, resident bytes and running requests per device; every one of these has a series even at zero.
- The process: bytes received from model sources, `refinery_build_info{version}`.

Each server owns its registry (several servers can live in one test process); `serve` exposes it on
`--metrics-port` at /metrics, and answers 404 on any other path (a health check must not mistake it for one).
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from modelstore import downloaded_bytes
from server.scheduling.snapshot import SchedulerSnapshot

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2)
_REQUEST_SECONDS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "refinery_requests",
            "Calls by method and gRPC status code, refused ones included",
            ["method", "code"],
            registry=r,
        )
        self.jobs = Counter(
            "refinery_jobs",
            "Generate requests by outcome (ok, cancelled, deadline_exceeded, rejected, failed)",
            ["outcome"],
            registry=r,
        )
        self.request_time = Histogram(
            "refinery_request_seconds",
            "Generate requests from admission to their end, by outcome",
            ["outcome"],
            buckets=_REQUEST_SECONDS,
            registry=r,
        )
        self.first_step = Histogram(
            "refinery_first_step_seconds",
            "From admission to a request's first denoising step (queue, downloads, loading included)",
            buckets=_SECONDS,
            registry=r,
        )
        self.images = Counter("refinery_images", "Images delivered to clients", registry=r)
        self.queue_wait = Histogram(
            "refinery_queue_wait_seconds", "Time from admission to a device", buckets=_SECONDS, registry=r
        )
        self.step_time = Histogram(
            "refinery_step_seconds", "Wall time of one denoising step", ["stage"], buckets=_STEP_SECONDS, registry=r
        )
        self.batch_images = Histogram(
            "refinery_batch_images", "Images denoised together", buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r
        )
        self.loads = Histogram(
            "refinery_model_load_seconds",
            "Loading a model pair onto a device",
            ["device"],
            buckets=_SECONDS,
            registry=r,
        )
        self.evictions = Histogram(
            "refinery_eviction_seconds", "Evicting idle pairs to make room", ["device"], buckets=_SECONDS, registry=r
        )
        self.budget_bytes = Gauge(
            "refinery_budget_bytes", "Memory budget for model weights on a device", ["device"], registry=r
        )
        build = Gauge("refinery_build_info", "The running build (always 1)", ["version"], registry=r)
        build.labels(_version()).set(1)
        for outcome in ("ok", "cancelled", "deadline_exceeded", "rejected", "failed"):
            self.jobs.labels(outcome)  # series at zero from the start, so rates, alerts and dashboards see them
            self.request_time.labels(outcome)
        self.calls.labels("Generate", "OK")
        r.register(_DownloadCollector())

    def watch(self, snapshot: Callable[[], SchedulerSnapshot]) -> None:
        """Read the gauges of current state from `snapshot` at every scrape."""
        self.registry.register(_SnapshotCollector(snapshot))

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        """Serve /metrics over HTTP (404 elsewhere) on a daemon thread; `.shutdown()` stops it."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would flood the log

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="refinery-metrics", daemon=True).start()
        return server


def _version() -> str:
    try:
        return importlib.metadata.version("refinery")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _DownloadCollector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "refinery_download_bytes", "Bytes received from model sources by this process", value=downloaded_bytes()
        )


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], SchedulerSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self._snapshot()
        depth = GaugeMetricFamily("refinery_queue_depth", "Requests waiting for a device", labels=["priority"])
        # An empty queue still has a series (priority 0, the default), so dashboards and the HPA read 0.
        for priority, count in sorted({0: 0, **status.depth_by_priority}.items()):
            depth.add_metric([str(priority)], count)
        resident = GaugeMetricFamily("refinery_resident_bytes", "Model weights resident on a device", labels=["device"])
        running = GaugeMetricFamily("refinery_jobs_running", "Requests running on a device", labels=["device"])
        for device in status.devices:
            resident.add_metric([device.name], device.resident_bytes)
            running.add_metric([device.name], device.jobs_running)
        yield from (depth, resident, running)
        yield from _compile_families(status)


def _compile_families(status: SchedulerSnapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Which UNet shapes are compiled (1 per shape, in its state), what compiling them took, how many UNet calls
    ran compiled or eagerly, and how long batches kept each device busy."""
    labels = ["device", "model", "role", "size", "state"]
    shapes = GaugeMetricFamily("refinery_compiled_shapes", "UNet shapes by compile state", labels=labels)
    seconds = GaugeMetricFamily(
        "refinery_compile_seconds", "Compiling a UNet shape (with its first run)", labels=labels[:4]
    )
    calls = CounterMetricFamily("refinery_unet_calls", "UNet calls by path", labels=["device", "path"])
    busy = CounterMetricFamily("refinery_device_busy_seconds", "Time a batch ran on the device", labels=["device"])
    for device in status.devices:
        for shape in device.compiled:
            size = f"{shape.width}x{shape.height}"
            shapes.add_metric([device.name, shape.model, shape.role, size, shape.state.value], 1)
            if shape.seconds:
                seconds.add_metric([device.name, shape.model, shape.role, size], shape.seconds)
        for path, count in sorted(device.unet_calls.items()):
            calls.add_metric([device.name, path], count)
        busy.add_metric([device.name], device.busy_s)
    yield from (shapes, seconds, calls, busy)
