"""Which queued request a free device takes next: affinity first, then no thrash, then the cheapest load.

A free device takes the first request (by priority, then arrival) whose pair it already holds; failing that,
one whose pair no other device holds and that fits here without evicting a pair some queued request waits for
(no thrash); failing that, it helps with a pair another busy device holds when two or more requests wait for
it. A pair is loaded where loading costs least (shared components count). Affinity never reorders requests
of different priorities.

Runs under the queue's lock on a worker thread: it must be quick and must not block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.core.domain import PairKey
from server.scheduling.queue import Waiting
from server.scheduling.residency import Residency
from server.scheduling.ticket import Ticket


class Placeable(Protocol):
    """What placement reads of a device: what it holds and whether it is running a batch."""

    @property
    def residency(self) -> Residency: ...

    @property
    def busy(self) -> bool: ...


def choose(
    device: Placeable, peers: Sequence[Placeable], runnable: list[Waiting[Ticket]], now: float
) -> Waiting[Ticket] | None:
    """The request `device` should take now, or None to leave every runnable request to the other devices."""
    waiting = [w for w in runnable if w.deadline is None or w.deadline > now]
    protected = {w.pair for w in waiting if isinstance(w.pair, PairKey)}
    for priority in sorted({w.priority for w in waiting}, reverse=True):
        group = [w for w in waiting if w.priority == priority]
        for w in group:
            if isinstance(w.pair, PairKey) and device.residency.holds(w.pair):
                return w
        for w in group:
            if _worth_loading_here(device, peers, w, waiting, protected):
                return w
    return None


def _worth_loading_here(
    device: Placeable,
    peers: Sequence[Placeable],
    candidate: Waiting[Ticket],
    waiting: list[Waiting[Ticket]],
    protected: set[PairKey],
) -> bool:
    spec = candidate.item.spec
    assert spec is not None, "only resolved requests are runnable"
    holders = [p for p in peers if p.residency.holds(spec.key)]
    if holders:
        if any(not h.busy for h in holders):
            return False  # an idle device already holds it and will take it
        if sum(1 for w in waiting if w.pair == spec.key) < 2:
            return False  # its device will get to it soon; a second copy is not worth loading
    else:
        cost = device.residency.load_cost(spec)
        if any(
            not p.busy and p.residency.load_cost(spec) < cost and p.residency.fits(spec, protected - {spec.key})
            for p in peers
        ):
            return False  # an idle device can load it more cheaply
    return device.residency.fits(spec, protected - {spec.key})
