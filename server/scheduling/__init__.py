"""Admission, resolution, placement and batching in front of one worker per device, with their residency.

This is the room's front door: the rooms above it (`server.api`, `server.app`) import only the names below,
never a module of this package (tests/test_layout.py holds them to it). The API works through `Engine`, the
protocol of the members it calls; only `server.app` builds the concrete `Scheduler`. Inside the package,
modules import each other directly.
"""

from server.scheduling.engine import Engine
from server.scheduling.scheduler import Scheduler
from server.scheduling.snapshot import DeviceSnapshot, SchedulerSnapshot
from server.scheduling.ticket import EventSink, Ticket

__all__ = ["DeviceSnapshot", "Engine", "EventSink", "Scheduler", "SchedulerSnapshot", "Ticket"]
