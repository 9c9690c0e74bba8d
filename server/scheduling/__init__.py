"""Admission, resolution, placement and batching in front of one worker per device, with their residency.

This is the room's front door: the rooms above it (`server.api`, `server.app`) import only the names below,
never a module of this package (tests/test_layout.py holds them to it). The API works through `Engine`, the
protocol of the members it calls; only `server.app` builds the concrete `Scheduler`. Inside the package,
modules import each other directly. A name's module is imported when the name is first used
(`server.core.front_door`): the API's types do not load the device workers, torch and diffusers.
"""

from typing import TYPE_CHECKING

from server.core.front_door import lazy_names

if TYPE_CHECKING:
    from server.scheduling.engine import Engine
    from server.scheduling.scheduler import Scheduler
    from server.scheduling.snapshot import DeviceSnapshot, SchedulerSnapshot
    from server.scheduling.spans import Trace, start_trace
    from server.scheduling.ticket import EventSink, Ticket

_NAMES = {
    "Engine": "engine:Engine",
    "Scheduler": "scheduler:Scheduler",
    "DeviceSnapshot": "snapshot:DeviceSnapshot",
    "SchedulerSnapshot": "snapshot:SchedulerSnapshot",
    "EventSink": "ticket:EventSink",
    "Ticket": "ticket:Ticket",
    "Trace": "spans:Trace",
    "start_trace": "spans:start_trace",
}
__getattr__ = lazy_names(__name__, _NAMES)
__all__ = [
    "DeviceSnapshot",
    "Engine",
    "EventSink",
    "Scheduler",
    "SchedulerSnapshot",
    "Ticket",
    "Trace",
    "start_trace",
]
