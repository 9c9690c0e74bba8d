"""The bounded priority queue: overload is refused at once, order is priority then FIFO, positions stay true."""

from __future__ import annotations

import threading

import pytest

from server.core.errors import Overloaded
from server.scheduling.queue import AdmissionQueue, Waiting

Queue = AdmissionQueue[str]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Item(str):
    """A queued name that records the positions announced to it."""

    positions: list[tuple[int, int]]


def first(waiting: list[Waiting[str]]) -> Waiting[str] | None:
    """The plain FIFO-within-priority choice."""
    return next(iter(waiting), None)


def submit(queue: Queue, name: str, priority: int = 0, **kw: object) -> Item:
    item = Item(name)
    item.positions = []
    queue.submit(item, priority=priority, on_position=lambda p, d: item.positions.append((p, d)), **kw)  # type: ignore[arg-type]
    return item


def names(items: list[str]) -> list[str]:
    return [str(i) for i in items]


def test_full_queue_refuses_at_once_with_a_retry_delay() -> None:
    queue = Queue(max_queue=2)
    submit(queue, "a")
    submit(queue, "b")
    with pytest.raises(Overloaded) as caught:
        submit(queue, "c")
    assert caught.value.retry_after_s >= 1.0
    assert queue.depth() == 2  # the refused request left no trace


def test_priority_first_then_fifo() -> None:
    queue = Queue(max_queue=10)
    for name, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("urgent", 9)]:
        submit(queue, name, priority)
    order = [str(queue.take(first, timeout=0)[0]) for _ in range(5)]
    assert order == ["urgent", "high1", "high2", "low1", "low2"]


def test_positions_are_announced_again_when_they_change() -> None:
    queue = Queue(max_queue=10)
    a = submit(queue, "a")
    b = submit(queue, "b")
    assert b.positions == [(1, 2)]
    submit(queue, "urgent", priority=1)  # jumps ahead: a and b move back
    assert a.positions[-1] == (1, 3) and b.positions[-1] == (2, 3)
    queue.take(first, timeout=0)  # urgent leaves: both move up
    assert a.positions[-1] == (0, 2) and b.positions[-1] == (1, 2)
    queue.cancel(a)
    assert b.positions[-1] == (0, 1)


def test_expired_items_leave_without_reaching_a_worker() -> None:
    clock = Clock()
    queue = Queue(max_queue=10, clock=clock)
    submit(queue, "soon", deadline=101.0)
    submit(queue, "later", deadline=200.0)
    clock.now = 150.0
    assert names(queue.expire()) == ["soon"]
    assert names(queue.take(first, timeout=0)) == ["later"]


def test_cancel_only_removes_queued_items() -> None:
    queue = Queue(max_queue=10)
    a = submit(queue, "a")
    assert queue.take(first, timeout=0) == [a]
    assert queue.cancel(a) is False  # already running: the worker stops it at the next step instead
    b = submit(queue, "b")
    assert queue.cancel(b) is True and queue.depth() == 0


def test_batch_takes_same_key_items_within_the_weight_limit() -> None:
    queue = Queue(max_queue=10)
    weights = {"a": 1, "x": 1, "b": 2, "c": 1, "d": 1}  # e.g. number_results of each request
    for name, key in [("a", "k"), ("x", "other"), ("b", "k"), ("c", "k"), ("d", "k")]:
        submit(queue, name, batch_key=key)
    batch = queue.take(first, max_batch=4, weight=lambda t: weights[t], timeout=0)
    assert names(batch) == ["a", "b", "c"]  # a(1) + b(2) + c(1) = 4; d would exceed; x has another key
    assert names(queue.snapshot()) == ["x", "d"]


def test_blocked_items_wait_until_unblocked() -> None:
    queue = Queue(max_queue=10)
    downloading = submit(queue, "downloading", blocked=True)
    submit(queue, "ready")
    assert names(queue.take(first, timeout=0)) == ["ready"]
    assert queue.take(first, timeout=0) == []
    queue.unblock(downloading)
    assert names(queue.take(first, timeout=0)) == ["downloading"]


def test_take_blocks_until_work_arrives_and_close_releases_waiters() -> None:
    queue = Queue(max_queue=10)
    got: list[list[str]] = []
    worker = threading.Thread(target=lambda: got.append(queue.take(first)))
    worker.start()
    submit(queue, "a")
    worker.join(timeout=5)
    assert names(got[0]) == ["a"]
    waiter = threading.Thread(target=lambda: got.append(queue.take(first)))
    waiter.start()
    left = queue.close()
    waiter.join(timeout=5)
    assert left == [] and got[1] == []
    with pytest.raises(Overloaded):
        submit(queue, "late")


def test_choose_can_skip_the_head_for_affinity() -> None:
    queue = Queue(max_queue=10)
    for name, pair in [("a1", "A"), ("b1", "B"), ("a2", "A")]:
        submit(queue, name, pair=pair)
    prefer_b = queue.take(lambda ts: next((t for t in ts if t.pair == "B"), None), timeout=0)
    assert names(prefer_b) == ["b1"]
    assert queue.waiting_pairs() == {"A"}
