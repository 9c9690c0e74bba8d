"""Prometheus metrics for operators: the queue, request outcomes, time in queue, step time, model loads and
evictions, resident bytes per device. Gauges of current state (queue depth per priority, resident bytes,
requests running) are read from the scheduler's snapshot at scrape time (`watch`), so they never drift from
the truth.

Each server owns its registry (several servers can live in one test process); `serve` exposes it on
`--metrics-port` at /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.scheduling.snapshot import SchedulerSnapshot

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "refinery_jobs_total",
            "Requests by outcome (ok, cancelled, deadline_exceeded, rejected, failed)",
            ["outcome"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "refinery_queue_wait_seconds", "Time from admission to a device", buckets=_SECONDS, registry=r
        )
        self.step_time = Histogram(
            "refinery_step_seconds",
            "Wall time of one denoising step",
            ["stage"],
            buckets=_STEP_SECONDS,
            registry=r,
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
            "refinery_eviction_seconds",
            "Evicting idle pairs to make room",
            ["device"],
            buckets=_SECONDS,
            registry=r,
        )
        self.budget_bytes = Gauge(
            "refinery_budget_bytes", "Memory budget for model weights on a device", ["device"], registry=r
        )

    def watch(self, snapshot: Callable[[], SchedulerSnapshot]) -> None:
        """Read the gauges of current state from `snapshot` at every scrape."""
        self.registry.register(_SnapshotCollector(snapshot))

    def serve(self, port: int, host: str = "0.0.0.0") -> Any:
        """Expose /metrics over HTTP; returns the server (call `.shutdown()` to stop it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], SchedulerSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self._snapshot()
        depth = GaugeMetricFamily("refinery_queue_depth", "Requests waiting for a device", labels=["priority"])
        for priority, count in sorted(status.depth_by_priority.items()):
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
