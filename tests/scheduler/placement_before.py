"""The queue and placement as they were before placement was indexed (server/scheduling/queue.py and
placement.py at commit 517777d), kept verbatim but for their imports: the brute-force reference that
test_placement_index.py checks the indexed queue against, and the "before" side of benchmarks/bench_placement.py.

Every wake-up of `take` lists the runnable items and `choose` scans them (O(n) per decision, O(n^2) to drain n
requests); `submit` finds its place by a linear scan; `cancel`, `expire` and the positions scan the whole list.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from server.core.domain import PairKey
from server.core.errors import Overloaded
from server.scheduling.residency import Residency
from server.scheduling.ticket import Ticket

T = TypeVar("T")

PositionCallback = Callable[[int, int], None]  # (position, depth)


@dataclass(eq=False)
class Waiting(Generic[T]):
    """An item's place in the queue, as `take`'s chooser sees it."""

    item: T
    priority: int = 0
    # Items with equal batch keys may run as one batch; None never batches.
    batch_key: Hashable | None = None
    # The pair of models the item needs: for affinity and so that no device evicts what a queued item needs.
    pair: Hashable | None = None
    deadline: float | None = None  # time.monotonic() seconds
    on_position: PositionCallback | None = None
    # Set while the item may not run yet (e.g. its models are still downloading).
    blocked: bool = False
    seq: int = field(default=0, init=False)
    position: int = field(default=-1, init=False)
    admitted_at: float = field(default=0.0, init=False)

    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


Chooser = Callable[[list[Waiting[T]]], Waiting[T] | None]


class AdmissionQueue(Generic[T]):
    def __init__(self, max_queue: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = max_queue
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: list[Waiting[T]] = []  # kept sorted by sort_key
        self._seq = itertools.count()
        self._closed = False
        # Exponentially weighted mean of how long an item waits; sizes RetryInfo when full.
        self._mean_wait_s = 1.0

    # ---- event-loop side --------------------------------------------------------------------------------

    def submit(
        self,
        item: T,
        *,
        priority: int = 0,
        batch_key: Hashable | None = None,
        pair: Hashable | None = None,
        deadline: float | None = None,
        on_position: PositionCallback | None = None,
        blocked: bool = False,
    ) -> None:
        place = Waiting(item, priority, batch_key, pair, deadline, on_position, blocked)
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down", retry_after_s=1.0)
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(
                    f"the queue is full ({self.max_queue} requests waiting); retry later",
                    retry_after_s=self.retry_after_s(),
                )
            place.seq = next(self._seq)
            place.admitted_at = self._clock()
            self._insert(place)
            self._cond.notify_all()
        self._announce()

    def cancel(self, item: T) -> bool:
        """Remove `item` if it is still queued; True if it was."""
        with self._cond:
            place = self._find(item)
            if place is None:
                return False
            self._waiting.remove(place)
        self._announce()
        return True

    def unblock(self, item: T) -> None:
        with self._cond:
            place = self._find(item)
            if place is not None:
                place.blocked = False
                self._cond.notify_all()

    def notify(self) -> None:
        """Wake waiting workers (e.g. a device became able to take more work)."""
        with self._cond:
            self._cond.notify_all()

    def expire(self) -> list[T]:
        """Remove and return the items whose deadline has passed."""
        now = self._clock()
        with self._cond:
            expired = [w for w in self._waiting if w.deadline is not None and w.deadline <= now]
            for w in expired:
                self._waiting.remove(w)
        if expired:
            self._announce()
        return [w.item for w in expired]

    def close(self) -> list[T]:
        """Refuse new items; return (and remove) the ones still waiting."""
        with self._cond:
            self._closed = True
            left, self._waiting = self._waiting, []
            self._cond.notify_all()
        return [w.item for w in left]

    # ---- worker side ------------------------------------------------------------------------------------

    def take(
        self,
        choose: Chooser[T],
        *,
        max_batch: int = 1,
        weight: Callable[[T], int] = lambda _item: 1,
        timeout: float | None = None,
    ) -> list[T]:
        """Block until `choose` picks one of the runnable items, then return it with more runnable items of the
        same batch key (in queue order) while their total `weight` (e.g. images) stays within `max_batch`.
        Returns [] on timeout or when the queue is closed."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                runnable = [w for w in self._waiting if not w.blocked]
                chosen = choose(runnable) if runnable else None
                if chosen is not None:
                    batch = self._batch(chosen, runnable, max_batch, weight)
                    break
                if self._closed:
                    return []
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
        self._announce()
        return batch

    def _batch(
        self, chosen: Waiting[T], runnable: list[Waiting[T]], max_batch: int, weight: Callable[[T], int]
    ) -> list[T]:
        batch = [chosen]
        total = weight(chosen.item)
        if chosen.batch_key is not None:
            for w in runnable:
                if w is chosen or w.batch_key != chosen.batch_key:
                    continue
                if total + weight(w.item) > max_batch:
                    break
                batch.append(w)
                total += weight(w.item)
        now = self._clock()
        for w in batch:
            self._waiting.remove(w)
            self._mean_wait_s = 0.8 * self._mean_wait_s + 0.2 * (now - w.admitted_at)
        return [w.item for w in batch]

    # ---- views ------------------------------------------------------------------------------------------

    def snapshot(self) -> list[T]:
        with self._cond:
            return [w.item for w in self._waiting]

    def depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    def depth_by_priority(self) -> dict[int, int]:
        with self._cond:
            counts: dict[int, int] = {}
            for w in self._waiting:
                counts[w.priority] = counts.get(w.priority, 0) + 1
            return counts

    def waiting_pairs(self) -> set[Hashable]:
        """Pairs that queued items need: a device must not evict these to serve another (no thrash)."""
        with self._cond:
            return {w.pair for w in self._waiting if w.pair is not None}

    def retry_after_s(self) -> float:
        return max(1.0, round(self._mean_wait_s, 1))

    # ---- internals --------------------------------------------------------------------------------------

    def _find(self, item: T) -> Waiting[T] | None:
        return next((w for w in self._waiting if w.item is item), None)

    def _insert(self, place: Waiting[T]) -> None:
        key = place.sort_key()
        index = next((i for i, other in enumerate(self._waiting) if other.sort_key() > key), len(self._waiting))
        self._waiting.insert(index, place)

    def _announce(self) -> None:
        """Tell every item whose position changed; callbacks run outside the lock."""
        with self._cond:
            depth = len(self._waiting)
            changed: list[tuple[Waiting[T], int]] = []
            for position, w in enumerate(self._waiting):
                if w.position != position:
                    w.position = position
                    changed.append((w, position))
        for w, position in changed:
            if w.on_position is not None:
                w.on_position(position, depth)


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
