"""Where one image's time goes on the device (torch profiler), and what a server's threads do under load
(py-spy, where it is installed).

`device_profile` runs one request by hand under the torch profiler with a named range around every UNet, VAE
and text-encoder call, and reports each one's device time, the device's busy share of the wall time, and the
host's time in the UNet calls (kernel launches: when it nears the device time, the host is the bottleneck
and anything taking the GIL from the worker slows the device down).
`thread_profile` samples a running server for a few seconds and reports, per thread, its share of the samples
that held the GIL and its hottest frames: what competes with the device worker for the interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._direct import Direct

# The modules timed, by where they hang: the pipelines call the VAE through `decode`, which is no forward, so
# its decoder is what is hooked; text_encoder_2 is one module for both stages.
_MODULES = ("base.unet", "refiner.unet", "base.vae.decoder", "base.text_encoder", "base.text_encoder_2")


def device_profile(direct: Direct, size: int, steps: int, base_steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    handles = []
    for path in _MODULES:
        module: Any = direct
        for attribute in path.split("."):
            module = getattr(module, attribute)
        handles += _ranges(module, path, record_function)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if direct.device.startswith("cuda") else [])
    try:
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            direct.generate(size, steps, base_steps)
            wall = time.perf_counter() - started
    finally:
        for handle in handles:
            handle.remove()
    return _summary(prof, wall)


def _ranges(module: Any, name: str, record_function: Callable[[str], Any]) -> list[Any]:
    """Forward hooks that open a profiler range before `module` runs and close it after."""
    opened: list[Any] = []

    def enter(*_: Any) -> None:
        opened.append(record_function(name))
        opened[-1].__enter__()

    def leave(*_: Any) -> None:
        opened.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def _summary(prof: Any, wall: float) -> dict[str, Any]:
    ranges: dict[str, dict[str, float]] = {}
    kernels_s = 0.0
    for event in prof.key_averages():
        device_s = getattr(event, "device_time_total", 0.0) / 1e6
        if "." in event.key and event.key.split(".")[0] in ("base", "refiner"):
            ranges[event.key] = {
                "calls": event.count,
                "device_s": round(device_s, 4),
                "host_s": round(event.cpu_time_total / 1e6, 4),
            }
        elif getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels_s += getattr(event, "self_device_time_total", 0.0) / 1e6
    return {"wall_s": round(wall, 4), "device_busy_share": round(kernels_s / wall, 3), "ranges": ranges}


def thread_profile(pid: int, seconds: float) -> dict[str, Any]:
    """py-spy's view of process `pid` (empty when py-spy is not installed)."""
    beside = Path(sys.executable).parent / "py-spy"  # a virtual environment's, when it is not on PATH
    binary = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if binary is None:
        return {"skipped": "py-spy is not installed"}
    command = [binary, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw"]
    command += ["--threads", "--gil", "--rate", "200", "--nonblocking", "--output", "/dev/stdout"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    threads: dict[str, dict[str, int]] = {}
    total = 0
    for line in out.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or line.startswith("py-spy>"):
            continue
        frames = threads.setdefault(stack.split(";")[0], {})
        frames[stack.split(";")[-1]] = frames.get(stack.split(";")[-1], 0) + int(count)
        total += int(count)
    return {
        thread: {
            "gil_share": round(sum(f.values()) / max(total, 1), 3),
            "top": sorted(f.items(), key=lambda x: -x[1])[:3],
        }
        for thread, f in threads.items()
    }
