"""`Ordered`: queued places kept in one order (queue order, or by deadline), the first found in O(log n).

A binary heap with lazy removal: removing a place forgets it at once (O(1)) and leaves its heap entry behind, to
be dropped when it reaches the top; once dropped entries outnumber the live ones the heap is rebuilt without
them, so the heap never holds more than about twice the live places and every operation stays O(log n)
amortised. Not thread-safe: the admission queue calls it under its lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

from server.scheduling.waiting import Waiting

T = TypeVar("T")

Key = tuple[float, ...]

# Tells a place's live entry from the dropped ones it left when it was removed and added again (a place whose
# deadline passes and un-passes moves between two orders), and breaks ties so that places are never compared.
_tokens = itertools.count()

# Below this many entries a heap is never rebuilt: dropping stale entries one by one is cheaper.
_REBUILD_FLOOR = 32


class Ordered(Generic[T]):
    def __init__(self, key: Callable[[Waiting[T]], Key]) -> None:
        self._key = key  # must not change while a place is in: priorities, arrival and deadlines are fixed
        self._heap: list[tuple[Key, int, Waiting[T]]] = []
        self._live: dict[Waiting[T], int] = {}  # place -> the token of its live entry

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, place: Waiting[T]) -> bool:
        return place in self._live

    def add(self, place: Waiting[T]) -> None:
        token = next(_tokens)
        self._live[place] = token
        heapq.heappush(self._heap, (self._key(place), token, place))

    def discard(self, place: Waiting[T]) -> None:
        if self._live.pop(place, None) is None:
            return
        if len(self._heap) > max(_REBUILD_FLOOR, 2 * len(self._live)):
            self._heap = [(self._key(p), token, p) for p, token in self._live.items()]
            heapq.heapify(self._heap)

    def first(self) -> Waiting[T] | None:
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def pop_first(self) -> Waiting[T] | None:
        """The first place, its entry taken off the heap while it stays in: to walk the order from the front,
        `restore` each place walked past (or `discard` it) before anything else reads this order."""
        place = self.first()
        if place is not None:
            heapq.heappop(self._heap)
        return place

    def restore(self, place: Waiting[T]) -> None:
        """Put back the entry `pop_first` took off for `place`, still in."""
        heapq.heappush(self._heap, (self._key(place), self._live[place], place))
