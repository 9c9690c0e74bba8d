"""GPU utilisation and memory gauges (server/scheduling/gpu_gauges.py) over a fake NVML module and a fake CUDA:
NVML's figures per device, matched by UUID; CUDA's memory (and no utilisation) without NVML or for a device NVML
cannot read; nothing at all for CPU devices. (That a CPU server exports none is checked through a real server in
tests/integration/test_metrics_truth.py.)"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from server.scheduling.gpu_gauges import GpuMeter, gpu_families

GIB = 1 << 30


class FakeNvml:
    """The part of pynvml the meter uses. Devices by NVML's own numbering, which CUDA_VISIBLE_DEVICES does not
    change: here CUDA's devices 0 and 1 are NVML's 2 and 0."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.devices = {
            "GPU-aaaa": SimpleNamespace(used=3 * GIB, total=80 * GIB, gpu=37),
            "GPU-bbbb": SimpleNamespace(used=1 * GIB, total=80 * GIB, gpu=0),
        }
        self.broken: set[str] = set()
        self.lookups: list[str] = []

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.lookups.append(uuid)
        if uuid not in self.devices:
            raise self.NVMLError("Not Found")
        return uuid

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        raise AssertionError("looked up by index although CUDA gave a UUID")

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        if handle in self.broken:
            raise self.NVMLError("Not Supported")
        device = self.devices[handle]
        return SimpleNamespace(used=device.used, total=device.total, free=device.total - device.used)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return SimpleNamespace(gpu=self.devices[handle].gpu, memory=0)


class FakeCuda:
    def __init__(self) -> None:
        self.uuids = {0: "GPU-aaaa", 1: "GPU-bbbb"}

    def index(self, device: str) -> int:
        return int(device.partition(":")[2] or 0)

    def uuid(self, index: int) -> str | None:
        return self.uuids[index]

    def mem_get_info(self, index: int) -> tuple[int, int]:
        return (70 * GIB, 80 * GIB)  # (free, total)


def _page(devices: list[str], meter: GpuMeter) -> dict[str, float]:
    class _Gauges(Collector):
        def collect(self) -> Any:
            return gpu_families(devices, meter)

    registry = CollectorRegistry()
    registry.register(_Gauges())
    text = generate_latest(registry).decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}


def test_nvml_gives_utilisation_and_memory_per_cuda_device_and_none_for_the_cpu() -> None:
    nvml = FakeNvml()
    page = _page(["cpu", "cuda:0", "cuda:1"], GpuMeter(nvml, FakeCuda()))
    assert page == {
        'refinery_gpu_utilization_ratio{device="cuda:0"}': 0.37,
        'refinery_gpu_utilization_ratio{device="cuda:1"}': 0.0,
        'refinery_gpu_memory_used_bytes{device="cuda:0"}': 3 * GIB,
        'refinery_gpu_memory_used_bytes{device="cuda:1"}': 1 * GIB,
        'refinery_gpu_memory_total_bytes{device="cuda:0"}': 80 * GIB,
        'refinery_gpu_memory_total_bytes{device="cuda:1"}': 80 * GIB,
    }


def test_readings_follow_the_device_at_every_scrape_and_handles_are_looked_up_once() -> None:
    nvml = FakeNvml()
    meter = GpuMeter(nvml, FakeCuda())
    _page(["cuda:0"], meter)
    nvml.devices["GPU-aaaa"].gpu = 91
    assert _page(["cuda:0"], meter)['refinery_gpu_utilization_ratio{device="cuda:0"}'] == 0.91
    assert nvml.lookups == ["GPU-aaaa"]


def test_without_nvml_memory_comes_from_cuda_and_there_is_no_utilisation() -> None:
    page = _page(["cuda:0"], GpuMeter(None, FakeCuda()))
    assert page == {
        'refinery_gpu_memory_used_bytes{device="cuda:0"}': 10 * GIB,
        'refinery_gpu_memory_total_bytes{device="cuda:0"}': 80 * GIB,
    }


def test_a_device_nvml_cannot_read_falls_back_to_cuda_alone(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml()
    nvml.broken.add("GPU-bbbb")
    meter = GpuMeter(nvml, FakeCuda())
    for _ in range(2):  # said once, not at every scrape
        page = _page(["cuda:0", "cuda:1"], meter)
    assert 'refinery_gpu_utilization_ratio{device="cuda:1"}' not in page
    assert page['refinery_gpu_utilization_ratio{device="cuda:0"}'] == 0.37
    assert page['refinery_gpu_memory_used_bytes{device="cuda:1"}'] == 10 * GIB
    assert [r.getMessage() for r in caplog.records if "NVML cannot read cuda:1" in r.getMessage()] != []
    assert len([r for r in caplog.records if "NVML cannot read" in r.getMessage()]) == 1


def test_cpu_devices_alone_export_no_gpu_series_and_never_touch_the_meter() -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the meter was asked for {name}")

    assert _page(["cpu"], Untouchable()) == {}  # type: ignore[arg-type]
