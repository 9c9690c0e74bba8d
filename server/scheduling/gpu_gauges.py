"""GPU utilisation and memory per CUDA device, read at every scrape (what Triton exports as `nv_gpu_*`):

    refinery_gpu_utilization_ratio{device}    0..1: the share of the driver's last sample period a kernel ran
    refinery_gpu_memory_used_bytes{device}    memory in use on the device, by every process on it
    refinery_gpu_memory_total_bytes{device}

They come from NVML (nvidia-ml-py, `import pynvml`: an optional dependency, `pip install nvidia-ml-py`) when it
is installed and a driver answers. Without NVML the memory series come from CUDA (`torch.cuda.mem_get_info`)
and there is no utilisation series. A CPU device has none of them, and a server on CPUs alone never imports
NVML. Devices are matched to NVML's by UUID, so CUDA_VISIBLE_DEVICES renumbering does not mix them up.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    memory_used_bytes: int
    memory_total_bytes: int
    utilization: float | None  # 0..1; None without NVML


class Cuda(Protocol):
    """What the meter asks CUDA (torch.cuda here; a fake in tests)."""

    def index(self, device: str) -> int: ...

    def uuid(self, index: int) -> str | None: ...

    def mem_get_info(self, index: int) -> tuple[int, int]:
        """(free, total) bytes."""
        ...


class TorchCuda:
    def index(self, device: str) -> int:
        import torch

        index = torch.device(device).index
        return int(torch.cuda.current_device()) if index is None else int(index)

    def uuid(self, index: int) -> str | None:
        import torch

        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is None:
            return None
        text = str(uuid)
        return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"  # NVML's spelling

    def mem_get_info(self, index: int) -> tuple[int, int]:
        import torch

        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total)


def load_nvml() -> Any | None:
    """NVML, initialised, or None when nvidia-ml-py is not installed or no driver answers."""
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception as exc:  # ImportError, or pynvml.NVMLError (no driver, no device, ...)
        log.info("GPU utilisation is not exported: NVML is unavailable (%s); memory comes from CUDA", exc)
        return None
    return nvml


class GpuMeter:
    """Reads a CUDA device's utilisation and memory: from `nvml` (a pynvml module) when given, else memory
    alone from `cuda`."""

    def __init__(self, nvml: Any | None, cuda: Cuda) -> None:
        self._nvml = nvml
        self._cuda = cuda
        self._handles: dict[int, Any] = {}
        self._failed: set[int] = set()  # devices NVML could not read once: CUDA's figures from then on

    @classmethod
    def probe(cls) -> GpuMeter:
        return cls(load_nvml(), TorchCuda())

    def read(self, device: str) -> GpuReading:
        index = self._cuda.index(device)
        if self._nvml is not None and index not in self._failed:
            try:
                return self._read_nvml(index)
            except Exception as exc:  # pynvml.NVMLError: a device NVML cannot read (some MIG slices, a lost GPU)
                log.warning("NVML cannot read %s (%s): its memory comes from CUDA, without utilisation", device, exc)
                self._failed.add(index)
        free, total = self._cuda.mem_get_info(index)
        return GpuReading(total - free, total, None)

    def _read_nvml(self, index: int) -> GpuReading:
        nvml = self._nvml
        assert nvml is not None
        handle = self._handles.get(index)
        if handle is None:
            uuid = self._cuda.uuid(index)
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles[index] = handle
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        return GpuReading(int(memory.used), int(memory.total), float(rates.gpu) / 100.0)


def gpu_families(devices: Iterable[str], meter: GpuMeter) -> Iterator[GaugeMetricFamily]:
    """The GPU gauges of the CUDA devices among `devices` (nothing at all when there are none)."""
    readings = [(device, meter.read(device)) for device in devices if device.startswith("cuda")]
    if not readings:
        return
    used = GaugeMetricFamily(
        "refinery_gpu_memory_used_bytes", "Memory in use on the GPU, all processes", labels=["device"]
    )
    total = GaugeMetricFamily("refinery_gpu_memory_total_bytes", "Memory of the GPU", labels=["device"])
    busy = GaugeMetricFamily(
        "refinery_gpu_utilization_ratio",
        "Share of the last sample period a kernel ran on the GPU (NVML)",
        labels=["device"],
    )
    for device, reading in readings:
        used.add_metric([device], reading.memory_used_bytes)
        total.add_metric([device], reading.memory_total_bytes)
        if reading.utilization is not None:
            busy.add_metric([device], reading.utilization)
    yield from (used, total)
    if busy.samples:
        yield busy
