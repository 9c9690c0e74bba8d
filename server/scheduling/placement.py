"""Which queued request a free device takes next: affinity first, then no thrash, then the cheapest load.

A free device takes the first request (by priority, then arrival) whose pair it already holds; failing that,
one whose pair no other device holds and that fits here without evicting a pair some queued request waits for
(no thrash); failing that, it helps with a pair another busy device holds when two or more requests wait for
it. A pair is loaded where loading costs least (shared components count). Affinity never reorders requests
of different priorities. A request whose deadline has passed is neither taken nor waited for.

Runs under the queue's lock on a worker thread: it must be quick and must not block. The answer for a request
depends only on its pair and resolved models (`group`), its priority and its arrival, so it is asked of the
first request of each group only (`Runnable.candidates`, in queue order): a decision costs O(G log G + G·D)
for G groups and D devices, whatever the number of queued requests, plus O(log n) amortised upkeep of the
queue's index. tests/scheduler/test_placement_index.py checks it against the scan it replaced.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol

from server.core.domain import PairKey
from server.scheduling.queue import Runnable, Waiting
from server.scheduling.residency import Residency
from server.scheduling.ticket import Ticket


class Placeable(Protocol):
    """What placement reads of a device: what it holds and whether it is running a batch."""

    @property
    def residency(self) -> Residency: ...

    @property
    def busy(self) -> bool: ...


def group(ticket: Ticket) -> Hashable:
    """What placement tells apart beside the pair (the queue's `group`): the models the pair resolved to, which
    is what loading costs and fits are measured on (the same pair resolved twice can name other files, e.g. a
    model pulled again in between)."""
    return ticket.spec


def choose(
    device: Placeable, peers: Sequence[Placeable], runnable: Runnable[Ticket], now: float
) -> Waiting[Ticket] | None:
    """The request `device` should take now, or None to leave every runnable request to the other devices."""
    candidates = runnable.candidates(now)
    protected = {pair for pair in candidates.waiting if isinstance(pair, PairKey)}
    # The first request (in queue order) whose pair this device holds: no earlier one at its priority can be
    # worth loading instead, so only the groups ahead of it, at a higher priority, are asked.
    held = next((w for w in candidates.heads if isinstance(w.pair, PairKey) and device.residency.holds(w.pair)), None)
    for w in candidates.heads:
        if held is not None and w.priority <= held.priority:
            break
        if _worth_loading_here(device, peers, w, candidates.waiting, protected):
            return w
    return held


def _worth_loading_here(
    device: Placeable,
    peers: Sequence[Placeable],
    candidate: Waiting[Ticket],
    waiting: Mapping[Hashable, int],
    protected: set[PairKey],
) -> bool:
    spec = candidate.item.spec
    assert spec is not None, "only resolved requests are runnable"
    holders = [p for p in peers if p.residency.holds(spec.key)]
    if holders:
        if any(not h.busy for h in holders):
            return False  # an idle device already holds it and will take it
        if waiting.get(spec.key, 0) < 2:
            return False  # its device will get to it soon; a second copy is not worth loading
    else:
        cost = device.residency.load_cost(spec)
        if any(
            not p.busy and p.residency.load_cost(spec) < cost and p.residency.fits(spec, protected - {spec.key})
            for p in peers
        ):
            return False  # an idle device can load it more cheaply
    return device.residency.fits(spec, protected - {spec.key})
