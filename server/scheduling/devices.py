"""Which torch devices the workers run on, in which dtype, and how much model memory each may hold."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceSpec:
    name: str  # a torch device string: "cpu", "cuda", "cuda:1"
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.name} ({str(self.dtype).removeprefix('torch.')})"


def resolve_device(requested: str) -> DeviceSpec:
    """ "auto" is the first CUDA device if there is one, else the CPU. Raises ValueError for a device that
    does not exist here.

    fp16 on accelerators halves memory and is how SDXL checkpoints are published; on the CPU fp16 kernels are
    slow or missing, so the CPU runs fp32.
    """
    name = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {requested!r} (try auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return DeviceSpec(name, torch.float32 if device.type == "cpu" else torch.float16)


def resolve_devices(requested: Iterable[str]) -> list[DeviceSpec]:
    """One spec per distinct device ("cuda" and "cuda:0" may be the same one)."""
    seen: dict[str, DeviceSpec] = {}
    for name in requested:
        device = resolve_device(name)
        seen.setdefault(str(torch.device(device.name)), device)
    return list(seen.values())


def is_cuda(device: DeviceSpec) -> bool:
    return str(torch.device(device.name).type) == "cuda"


def device_budget(device: DeviceSpec, *, budget_bytes: int, headroom_fraction: float) -> int:
    """Bytes of model weights a device may hold: `budget_bytes` if set, else the device's memory less a
    headroom fraction for activations, the VAE decode and the allocator's slack."""
    if budget_bytes:
        return budget_bytes
    if is_cuda(device):
        total = torch.cuda.get_device_properties(torch.device(device.name)).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * (1.0 - headroom_fraction))


def allocated_bytes(device: DeviceSpec) -> int:
    """What torch's allocator holds on the device right now (0 on the CPU, where it is not tracked)."""
    return int(torch.cuda.memory_allocated(torch.device(device.name))) if is_cuda(device) else 0


def memory_releaser(device: DeviceSpec) -> Callable[[], None]:
    """Returns memory freed by evicted modules to the device: garbage collection, then CUDA's cache."""

    def release() -> None:
        gc.collect()
        if is_cuda(device):
            with torch.cuda.device(torch.device(device.name)):
                torch.cuda.empty_cache()

    return release


def cpu_threads() -> int:
    """Intra-op threads for generation on the CPU: all cores but one, and never more than torch would use by
    itself, so a lower OMP_NUM_THREADS set by an operator stands.

    Why: between operations OpenMP threads spin-wait for the next one. When they fill every core, the
    event-loop and gRPC threads that stream each step's events (and need the GIL to do it) barely get
    scheduled, and the worker then waits on them for the GIL: on a 2-core machine a 0.3 s tiny-model job took
    2-14 s through gRPC until one core was left free (benchmarks/bench_generate.py measures the overhead).

    The count is a per-thread setting in OpenMP: every CPU worker sets it on its own thread (a count set on
    another thread does not reach threads that already exist), and images that must equal a run by hand are
    computed with the same count, since another count sums in another order.
    """
    return min(int(torch.get_num_threads()), max(1, (os.cpu_count() or 1) - 1))
