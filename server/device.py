"""Which torch device and dtype a worker runs on."""

from __future__ import annotations

import os
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


def leave_a_core_for_io(device: DeviceSpec) -> int | None:
    """On a CPU device, cap torch's intra-op threads at all cores but one; returns the new count, or None if
    nothing changed. Only ever lowers the count, so a lower OMP_NUM_THREADS set by an operator stands.

    Why: between operations OpenMP threads spin-wait for the next one. When they fill every core, the
    event-loop and gRPC threads that stream each step's events (and need the GIL to do it) barely get
    scheduled, and the worker then waits on them for the GIL: on a 2-core machine a 0.3 s tiny-model job took
    2-14 s through gRPC until one core was left free (benchmarks/bench_generate.py measures the overhead).
    """
    if torch.device(device.name).type != "cpu":
        return None
    threads = max(1, (os.cpu_count() or 1) - 1)
    if torch.get_num_threads() <= threads:
        return None
    torch.set_num_threads(threads)
    return threads
