"""`Runnable`: the admission queue's runnable places (not blocked), indexed so that a placement decision and the
batch that follows it cost O(log n) in the n queued requests, not a scan of the queue.

Placement's answer for a request depends on its pair, what its models resolved to, its priority and its arrival,
never on anything else about it; so the requests that share a pair and resolved models (a *group*) get the same
answer, and only each group's first matters. The index keeps:

- each group's unexpired places in queue order (priority, then arrival), and how many unexpired places need
  each pair, kept as places come and go instead of counted at each decision;
- each batch key's places in queue order, expired or not (as before, a request past its deadline that the
  reaper has not removed yet may still join a batch);
- the unexpired places with a deadline by deadline, and the expired ones by deadline, latest first: a decision
  at `now` moves the places whose deadline passed since the last one out of their group, and back should `now`
  ever go back.

Costs, n runnable places, G groups with an unexpired place:
- `add`, `remove`: O(log n) amortised.
- `candidates(now)`: O(G log G), plus O(log n) amortised for each place whose deadline passed since the last call.
- `mates`: O((k + 1) log n) for a batch of k.
- iterating (a chooser that wants every runnable place in queue order): O(n).
Not thread-safe: the queue calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, TypeVar

from server.scheduling.ordered import Key, Ordered
from server.scheduling.waiting import Waiting

T = TypeVar("T")


def _queue_order(place: Waiting[T]) -> Key:
    return place.sort_key()


def _soonest(place: Waiting[T]) -> Key:
    assert place.deadline is not None
    return (place.deadline,)


def _latest(place: Waiting[T]) -> Key:
    assert place.deadline is not None
    return (-place.deadline,)


@dataclass(frozen=True)
class Candidates(Generic[T]):
    """What placement reads at one decision: only places whose deadline has not passed."""

    heads: list[Waiting[T]]  # each group's first place, in queue order
    waiting: Mapping[Hashable, int]  # pair -> how many places need it (only pairs some place needs)


class Runnable(Generic[T]):
    def __init__(self, order: Sequence[Waiting[T]], group: Callable[[T], Hashable]) -> None:
        self._order = order  # the queue's places in queue order, blocked ones included
        self._group = group  # what placement also tells apart beside the pair (the scheduler: resolved models)
        self._group_of: dict[Waiting[T], Hashable] = {}  # every runnable place -> its group's key
        self._groups: dict[Hashable, Ordered[T]] = {}  # group key -> its unexpired places
        self._waiting: dict[Hashable, int] = {}  # pair -> unexpired places that need it
        self._batches: dict[Hashable, Ordered[T]] = {}  # batch key -> its places, expired or not
        self._due: Ordered[T] = Ordered(_soonest)  # unexpired places with a deadline
        self._lapsed: Ordered[T] = Ordered(_latest)  # places whose deadline had passed at the last decision

    def __len__(self) -> int:
        return len(self._group_of)

    def __iter__(self) -> Iterator[Waiting[T]]:
        return (place for place in self._order if not place.blocked)

    # ---- changes (the queue's) --------------------------------------------------------------------------

    def add(self, place: Waiting[T]) -> None:
        """`place` became runnable: admitted unblocked, or unblocked."""
        self._group_of[place] = (place.pair, self._group(place.item))
        if place.batch_key is not None:
            self._batches.setdefault(place.batch_key, Ordered(_queue_order)).add(place)
        self._enter(place)  # as unexpired: the next decision moves it out if its deadline has passed

    def remove(self, place: Waiting[T]) -> None:
        """`place` left the queue (a no-op if it was blocked)."""
        if place not in self._group_of:
            return
        if place in self._lapsed:
            self._lapsed.discard(place)
        else:
            self._leave(place)
        del self._group_of[place]
        if place.batch_key is not None:
            _discard(self._batches, place.batch_key, place)

    # ---- reads (the chooser's) --------------------------------------------------------------------------

    def candidates(self, now: float) -> Candidates[T]:
        """Each group's first place whose deadline is unset or after `now`, in queue order, and how many such
        places need each pair. Valid until the queue next changes."""
        self._sweep(now)
        heads = [place for group in self._groups.values() if (place := group.first()) is not None]
        heads.sort(key=Waiting.sort_key)
        return Candidates(heads, MappingProxyType(self._waiting))

    def mates(self, chosen: Waiting[T], room: int, weight: Callable[[T], int]) -> list[Waiting[T]]:
        """The other runnable places with `chosen`'s batch key, in queue order, while their total weight stays
        within `room`; the first that would not fit ends the batch (a lighter one behind it never jumps it)."""
        same = None if chosen.batch_key is None else self._batches.get(chosen.batch_key)
        if same is None:
            return []
        mates: list[Waiting[T]] = []
        passed: list[Waiting[T]] = []
        while (place := same.pop_first()) is not None:
            if place is chosen:
                passed.append(place)
                continue
            heavy = weight(place.item)
            if heavy > room:
                passed.append(place)
                break
            room -= heavy
            mates.append(place)
        for place in passed + mates:  # the mates' entries too: they stay in until the queue removes them
            same.restore(place)
        return mates

    # ---- internals --------------------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        while (place := self._due.first()) is not None and _deadline(place) <= now:
            self._leave(place)
            self._lapsed.add(place)
        while (place := self._lapsed.first()) is not None and _deadline(place) > now:  # `now` went back
            self._lapsed.discard(place)
            self._enter(place)

    def _enter(self, place: Waiting[T]) -> None:
        self._groups.setdefault(self._group_of[place], Ordered(_queue_order)).add(place)
        self._waiting[place.pair] = self._waiting.get(place.pair, 0) + 1
        if place.deadline is not None:
            self._due.add(place)

    def _leave(self, place: Waiting[T]) -> None:
        _discard(self._groups, self._group_of[place], place)
        left = self._waiting[place.pair] - 1
        if left:
            self._waiting[place.pair] = left
        else:
            del self._waiting[place.pair]
        self._due.discard(place)


def _deadline(place: Waiting[T]) -> float:
    assert place.deadline is not None
    return place.deadline


def _discard(table: dict[Hashable, Ordered[T]], key: Hashable, place: Waiting[T]) -> None:
    """Take `place` out of `table[key]`, and the order out of the table once it is empty."""
    order = table[key]
    order.discard(place)
    if not order:
        del table[key]
