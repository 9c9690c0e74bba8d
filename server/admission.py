"""The bounded priority queue in front of the device workers.

- Bounded: when it is full a new request is refused at once with `Overloaded` (RESOURCE_EXHAUSTED + RetryInfo)
  instead of waiting forever; every admitted entry leaves it exactly once: taken by a worker, cancelled, or
  expired.
- Ordered by priority (higher first), FIFO within a priority. A entry's position is its index in that order;
  whenever positions change every affected entry is told (`on_position`), so clients see `Queued` events that
  stay true.
- Workers do not simply pop the head: `take` lets the dispatcher pick the first entry it *prefers* (a pair the
  device already holds) so affinity never reorders jobs of different priorities, only jobs of equal priority.
- Entries whose deadline passes while queued are removed and reported by `expire`, never reaching a device.

Thread-safe: the event loop submits and cancels, worker threads take.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from server.errors import Overloaded


@dataclass(eq=False)
class Entry:
    """One admitted request waiting for (or running on) a device."""

    payload: Any  # what the dispatcher needs to run it (a job, its sink, resolved models...)
    priority: int = 0
    # Entries with equal batch keys may run as one batch; None never batches.
    batch_key: Hashable | None = None
    # The pair of models it needs; the dispatcher uses it for affinity and anti-thrash.
    pair: Hashable | None = None
    deadline: float | None = None  # time.monotonic() seconds
    on_position: Callable[[int, int], None] | None = None  # (position, depth)
    # Set while the entry may not run yet (e.g. its models are still downloading).
    blocked: bool = False
    seq: int = field(default=0, init=False)
    position: int = field(default=-1, init=False)
    admitted_at: float = field(default=0.0, init=False)

    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class JobQueue:
    def __init__(self, max_queue: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = max_queue
        self._clock = clock
        self._cond = threading.Condition()
        self._entries: list[Entry] = []  # kept sorted by sort_key
        self._seq = itertools.count()
        self._closed = False
        # Exponentially weighted mean of how long a entry waits; sizes RetryInfo when full.
        self._mean_wait_s = 1.0

    # ---- event-loop side --------------------------------------------------------------------------------

    def submit(self, entry: Entry) -> None:
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down", retry_after_s=1.0)
            if len(self._entries) >= self.max_queue:
                raise Overloaded(
                    f"the queue is full ({self.max_queue} requests waiting); retry later",
                    retry_after_s=self.retry_after_s(),
                )
            entry.seq = next(self._seq)
            entry.admitted_at = self._clock()
            self._insert(entry)
            self._cond.notify_all()
        self._announce()

    def cancel(self, entry: Entry) -> bool:
        """Remove `entry` if it is still queued; True if it was."""
        with self._cond:
            if entry not in self._entries:
                return False
            self._entries.remove(entry)
        self._announce()
        return True

    def unblock(self, entry: Entry) -> None:
        with self._cond:
            entry.blocked = False
            self._cond.notify_all()

    def notify(self) -> None:
        """Wake waiting workers (e.g. a device became able to take more work)."""
        with self._cond:
            self._cond.notify_all()

    def expire(self) -> list[Entry]:
        """Remove and return the entries whose deadline has passed."""
        now = self._clock()
        with self._cond:
            expired = [t for t in self._entries if t.deadline is not None and t.deadline <= now]
            for t in expired:
                self._entries.remove(t)
        if expired:
            self._announce()
        return expired

    def close(self) -> list[Entry]:
        """Refuse new entries; return (and remove) the ones still waiting."""
        with self._cond:
            self._closed = True
            left, self._entries = self._entries, []
            self._cond.notify_all()
        return left

    # ---- worker side ------------------------------------------------------------------------------------

    def take(
        self,
        choose: Callable[[list[Entry]], Entry | None],
        *,
        max_batch: int = 1,
        weight: Callable[[Entry], int] = lambda _t: 1,
        timeout: float | None = None,
    ) -> list[Entry]:
        """Block until `choose` picks a entry among the runnable ones, then return it with more runnable
        entries of the same batch key (in queue order) while their total `weight` (e.g. images) stays within
        `max_batch`. Returns [] on timeout or when the queue is closed."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                runnable = [t for t in self._entries if not t.blocked]
                chosen = choose(runnable) if runnable else None
                if chosen is not None:
                    batch = [chosen]
                    total = weight(chosen)
                    if chosen.batch_key is not None:
                        for t in runnable:
                            if t is chosen or t.batch_key != chosen.batch_key:
                                continue
                            if total + weight(t) > max_batch:
                                break
                            batch.append(t)
                            total += weight(t)
                    now = self._clock()
                    for t in batch:
                        self._entries.remove(t)
                        wait = now - t.admitted_at
                        self._mean_wait_s = 0.8 * self._mean_wait_s + 0.2 * wait
                    break
                if self._closed:
                    return []
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
        self._announce()
        return batch

    # ---- views ------------------------------------------------------------------------------------------

    def snapshot(self) -> list[Entry]:
        with self._cond:
            return list(self._entries)

    def depth(self) -> int:
        with self._cond:
            return len(self._entries)

    def depth_by_priority(self) -> dict[int, int]:
        with self._cond:
            counts: dict[int, int] = {}
            for t in self._entries:
                counts[t.priority] = counts.get(t.priority, 0) + 1
            return counts

    def waiting_pairs(self) -> set[Hashable]:
        """Pairs that queued entries need: a device must not evict these to serve another (no thrash)."""
        with self._cond:
            return {t.pair for t in self._entries if t.pair is not None}

    def retry_after_s(self) -> float:
        return max(1.0, round(self._mean_wait_s, 1))

    # ---- internals --------------------------------------------------------------------------------------

    def _insert(self, entry: Entry) -> None:
        key = entry.sort_key()
        index = len(self._entries)
        for i, other in enumerate(self._entries):
            if other.sort_key() > key:
                index = i
                break
        self._entries.insert(index, entry)

    def _announce(self) -> None:
        """Tell every entry whose position changed; callbacks run outside the lock."""
        with self._cond:
            depth = len(self._entries)
            changed: list[tuple[Entry, int]] = []
            for position, t in enumerate(self._entries):
                if t.position != position:
                    t.position = position
                    changed.append((t, position))
        for t, position in changed:
            if t.on_position is not None:
                t.on_position(position, depth)


def first(entries: Iterable[Entry]) -> Entry | None:
    """The plain FIFO-within-priority choice."""
    return next(iter(entries), None)
