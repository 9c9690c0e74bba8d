"""The bounded priority queue in front of the device workers, generic in what it holds (the scheduler's
tickets; the tests' strings).

- Bounded: when it is full a new item is refused at once with `Overloaded` (RESOURCE_EXHAUSTED + RetryInfo)
  instead of waiting forever; every admitted item leaves it exactly once: taken by a worker, cancelled, or
  expired.
- Ordered by priority (higher first), FIFO within a priority. An item's position is its index in that order;
  whenever positions change every affected item is told (`on_position`), so clients see `Queued` events that
  stay true.
- Workers do not simply pop the head: `take` lets the caller pick the first item it *prefers* (a pair the
  device already holds), so affinity never reorders items of different priorities, only items of equal
  priority.
- Items whose deadline passes while queued are removed and reported by `expire`, never reaching a device.

Indexed, so that the queue's length costs a worker little (issue 19, "placement that scales"): the chooser gets
the runnable items as `Runnable` (runnable.py), whose index answers placement in O(log n) amortised; the batch
that follows, `cancel`, `unblock` and each expired item cost O(log n) to find; the counts behind `depth_by_priority`
and `waiting_pairs` are kept, not counted. What stays linear is owed to the items themselves: the `on_position`
calls when positions change (the items behind a change move, and each is told), one memmove of the list
of places (pointers, microseconds at 10,000), and `snapshot` / `close`, which return every item.

Thread-safe: the event loop submits and cancels, worker threads take.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from server.core.errors import Overloaded
from server.scheduling.ordered import Key, Ordered
from server.scheduling.runnable import Runnable
from server.scheduling.waiting import PositionCallback, Waiting

__all__ = ["AdmissionQueue", "Chooser", "PositionCallback", "Runnable", "Waiting"]

T = TypeVar("T")

Chooser = Callable[[Runnable[T]], Waiting[T] | None]


def _no_group(_item: object) -> Hashable:
    return None


def _by_deadline(place: Waiting[T]) -> Key:
    assert place.deadline is not None
    return (place.deadline,)


class AdmissionQueue(Generic[T]):
    def __init__(
        self,
        max_queue: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        group: Callable[[T], Hashable] = _no_group,
    ) -> None:
        """`group(item)`, asked once an item is runnable: what the chooser's answer depends on beside the item's
        pair, priority and arrival (the scheduler: its resolved models), so that `Runnable` can answer for each
        group at once."""
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = max_queue
        self._clock = clock
        self._group = group
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        # Exponentially weighted mean of how long an item waits; sizes RetryInfo when full.
        self._mean_wait_s = 1.0
        self._reset()

    def _reset(self) -> None:
        self._waiting: list[Waiting[T]] = []  # kept sorted by sort_key
        self._runnable = Runnable(self._waiting, self._group)
        self._places: dict[int, list[Waiting[T]]] = {}  # id(item) -> its places (one, unless submitted twice)
        self._deadlines: Ordered[T] = Ordered(_by_deadline)
        self._pairs: dict[Hashable, int] = {}  # pair -> queued items that need it, blocked or not
        self._by_priority: dict[int, int] = {}
        self._listening = 0  # queued items with an `on_position`: without any, positions need no upkeep

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
            index = self._insert(place)
            self._cond.notify_all()
        self._announce(index)

    def cancel(self, item: T) -> bool:
        """Remove `item` if it is still queued; True if it was."""
        with self._cond:
            place = self._find(item)
            if place is None:
                return False
            start = self._remove([place])
        self._announce(start)
        return True

    def unblock(self, item: T) -> None:
        with self._cond:
            place = self._find(item)
            if place is not None:
                if place.blocked:
                    place.blocked = False
                    self._runnable.add(place)
                self._cond.notify_all()

    def notify(self) -> None:
        """Wake waiting workers (e.g. a device became able to take more work)."""
        with self._cond:
            self._cond.notify_all()

    def expire(self) -> list[T]:
        """Remove and return the items whose deadline has passed."""
        now = self._clock()
        with self._cond:
            expired: list[Waiting[T]] = []
            while (place := self._deadlines.first()) is not None and _by_deadline(place)[0] <= now:
                self._deadlines.discard(place)
                expired.append(place)
            expired.sort(key=Waiting.sort_key)
            start = self._remove(expired) if expired else 0
        if expired:
            self._announce(start)
        return [w.item for w in expired]

    def close(self) -> list[T]:
        """Refuse new items; return (and remove) the ones still waiting."""
        with self._cond:
            self._closed = True
            left = self._waiting
            self._reset()
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
                chosen = choose(self._runnable) if self._runnable else None
                if chosen is not None:
                    batch, start = self._batch(chosen, max_batch, weight)
                    break
                if self._closed:
                    return []
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
        self._announce(start)
        return batch

    def take_joiners(self, matches: Callable[[T], bool], room: int, weight: Callable[[T], int]) -> list[T]:
        """Without waiting: the runnable items at the head of the queue (priority, then arrival), in order, while
        each `matches` and their total `weight` fits `room`. None past the first that does not: a later item
        never overtakes it (step-level batching's joins, server/scheduling/continuous.py). Each item taken costs
        a placement read, O(G log G) for G groups, and its removal, O(log n)."""
        taken: list[Waiting[T]] = []
        start: int | None = None
        with self._cond:
            now = self._clock()
            while room > 0 and (heads := self._runnable.candidates(now).heads):
                head = heads[0]
                if not matches(head.item) or weight(head.item) > room:
                    break
                room -= weight(head.item)
                self._mean_wait_s = 0.8 * self._mean_wait_s + 0.2 * (now - head.admitted_at)
                index = self._remove([head])
                start = index if start is None else min(start, index)
                taken.append(head)
        if start is not None:
            self._announce(start)
        return [w.item for w in taken]

    def _batch(self, chosen: Waiting[T], max_batch: int, weight: Callable[[T], int]) -> tuple[list[T], int]:
        batch = [chosen, *self._runnable.mates(chosen, max_batch - weight(chosen.item), weight)]
        now = self._clock()
        for w in batch:
            self._mean_wait_s = 0.8 * self._mean_wait_s + 0.2 * (now - w.admitted_at)
        return [w.item for w in batch], self._remove(batch)

    # ---- views ------------------------------------------------------------------------------------------

    def snapshot(self) -> list[T]:
        with self._cond:
            return [w.item for w in self._waiting]

    def depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    def depth_by_priority(self) -> dict[int, int]:
        with self._cond:
            return {priority: self._by_priority[priority] for priority in sorted(self._by_priority, reverse=True)}

    def waiting_pairs(self) -> set[Hashable]:
        """Pairs that queued items need: a device must not evict these to serve another (no thrash)."""
        with self._cond:
            return set(self._pairs)

    def retry_after_s(self) -> float:
        return max(1.0, round(self._mean_wait_s, 1))

    # ---- internals --------------------------------------------------------------------------------------

    def _find(self, item: T) -> Waiting[T] | None:
        places = self._places.get(id(item))
        return None if places is None else min(places, key=Waiting.sort_key)

    def _insert(self, place: Waiting[T]) -> int:
        """Queue `place`; its index."""
        index = bisect.bisect_left(self._waiting, place.sort_key(), key=Waiting.sort_key)
        self._waiting.insert(index, place)
        self._places.setdefault(id(place.item), []).append(place)
        if place.deadline is not None:
            self._deadlines.add(place)
        if place.pair is not None:
            self._pairs[place.pair] = self._pairs.get(place.pair, 0) + 1
        self._by_priority[place.priority] = self._by_priority.get(place.priority, 0) + 1
        self._listening += place.on_position is not None
        if not place.blocked:
            self._runnable.add(place)
        return index

    def _remove(self, places: list[Waiting[T]]) -> int:
        """Take `places` (queued, distinct) out of the queue; the first index that changed."""
        indexes = sorted(bisect.bisect_left(self._waiting, w.sort_key(), key=Waiting.sort_key) for w in places)
        for index in reversed(indexes):
            del self._waiting[index]
        for place in places:
            same_item = self._places[id(place.item)]
            same_item.remove(place)
            if not same_item:
                del self._places[id(place.item)]
            self._deadlines.discard(place)
            if place.pair is not None:
                _decrement(self._pairs, place.pair)
            _decrement(self._by_priority, place.priority)
            self._listening -= place.on_position is not None
            self._runnable.remove(place)
        return indexes[0]

    def _announce(self, start: int) -> None:
        """Tell every item at or after `start` whose position changed; callbacks run outside the lock. Before
        `start` nothing moved: each change announces from its own first changed index."""
        with self._cond:
            depth = len(self._waiting)
            changed: list[tuple[Waiting[T], int]] = []
            if self._listening:
                for position in range(start, depth):
                    w = self._waiting[position]
                    if w.position != position:
                        w.position = position
                        changed.append((w, position))
        for w, position in changed:
            if w.on_position is not None:
                w.on_position(position, depth)


def _decrement(counts: dict[T, int], key: T) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
