"""What the scheduler is doing right now, as plain values: for ServerService.GetStatus and the metrics' gauges."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.generation import ShapeStatus
from server.scheduling.residency import ResidentPair


@dataclass(frozen=True)
class DeviceSnapshot:
    name: str
    budget_bytes: int
    resident_bytes: int
    allocated_bytes: int
    pairs: tuple[ResidentPair, ...]
    jobs_running: int
    busy_s: float = 0.0  # seconds a batch ran on the device since start (loading, denoising, decoding)
    tuning: str = ""  # the speed options in force ("compile off" when untuned)
    compiled: tuple[ShapeStatus, ...] = ()  # every UNet shape compiled, compiling or queued
    unet_calls: dict[str, int] = field(default_factory=dict)  # "compiled" / "eager": UNet calls by path


@dataclass(frozen=True)
class SchedulerSnapshot:
    devices: tuple[DeviceSnapshot, ...]
    queue_depth: int
    max_queue: int
    depth_by_priority: dict[int, int] = field(default_factory=dict)

    @property
    def jobs_running(self) -> int:
        return sum(d.jobs_running for d in self.devices)
