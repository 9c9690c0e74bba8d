"""Which torch device and dtype a worker runs on."""

from __future__ import annotations

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
