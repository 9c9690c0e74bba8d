"""The scheduler's snapshot as Prometheus gauges, read at every scrape so they never drift: queue depth per
priority, resident bytes and running requests per device, compiled UNet shapes, UNet calls by path and device
busy time. Every one of these has a series even at zero. Registered with `Metrics.watch`. On CUDA devices also
their utilisation and memory (`gpu_gauges.py`; absent on CPUs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.core.domain import WINDOW_TOKENS
from server.scheduling.gpu_gauges import GpuMeter, gpu_families
from server.scheduling.snapshot import SchedulerSnapshot


class SnapshotGauges(Collector):
    def __init__(self, snapshot: Callable[[], SchedulerSnapshot], gpu: GpuMeter | None = None) -> None:
        self._snapshot = snapshot
        self._gpu = gpu  # probed at the first scrape that finds a CUDA device

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
        cuda = [device.name for device in status.devices if device.name.startswith("cuda")]
        if cuda:
            self._gpu = self._gpu or GpuMeter.probe()
            yield from gpu_families(cuda, self._gpu)


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
            if shape.tokens != WINDOW_TOKENS:  # a long prompt's shape: the text length told apart
                size += f"/{shape.tokens}t"
            shapes.add_metric([device.name, shape.model, shape.role, size, shape.state.value], 1)
            if shape.seconds:
                seconds.add_metric([device.name, shape.model, shape.role, size], shape.seconds)
        for path, count in sorted(device.unet_calls.items()):
            calls.add_metric([device.name, path], count)
        busy.add_metric([device.name], device.busy_s)
    yield from (shapes, seconds, calls, busy)
