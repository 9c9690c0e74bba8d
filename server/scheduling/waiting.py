"""`Waiting`: one item's place in the admission queue, as the queue, its indexes and `take`'s chooser see it."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

PositionCallback = Callable[[int, int], None]  # (position, depth)


@dataclass(eq=False)  # compared and hashed by identity: the indexes key their tables by the place itself
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
