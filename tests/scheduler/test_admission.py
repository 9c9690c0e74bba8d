"""The bounded priority queue: overload is refused at once, order is priority then FIFO, positions stay true."""

from __future__ import annotations

import threading

import pytest

from server.admission import Entry, JobQueue, first
from server.errors import Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ticket(name: str, priority: int = 0, **kw: object) -> Entry:
    positions: list[tuple[int, int]] = []
    t = Entry(payload=name, priority=priority, on_position=lambda p, d: positions.append((p, d)), **kw)  # type: ignore[arg-type]
    t.positions = positions  # type: ignore[attr-defined]
    return t


def names(tickets: list[Entry]) -> list[str]:
    return [t.payload for t in tickets]


def test_full_queue_refuses_at_once_with_a_retry_delay() -> None:
    queue = JobQueue(max_queue=2)
    queue.submit(ticket("a"))
    queue.submit(ticket("b"))
    with pytest.raises(Overloaded) as caught:
        queue.submit(ticket("c"))
    assert caught.value.retry_after_s >= 1.0
    assert queue.depth() == 2  # the refused request left no trace


def test_priority_first_then_fifo() -> None:
    queue = JobQueue(max_queue=10)
    for name, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("urgent", 9)]:
        queue.submit(ticket(name, priority))
    order = [queue.take(first, timeout=0)[0].payload for _ in range(5)]
    assert order == ["urgent", "high1", "high2", "low1", "low2"]


def test_positions_are_announced_again_when_they_change() -> None:
    queue = JobQueue(max_queue=10)
    a, b = ticket("a"), ticket("b")
    queue.submit(a)
    queue.submit(b)
    assert b.positions == [(1, 2)]  # type: ignore[attr-defined]
    urgent = ticket("urgent", priority=1)
    queue.submit(urgent)  # jumps ahead: a and b move back
    assert a.positions[-1] == (1, 3) and b.positions[-1] == (2, 3)  # type: ignore[attr-defined]
    queue.take(first, timeout=0)  # urgent leaves: both move up
    assert a.positions[-1] == (0, 2) and b.positions[-1] == (1, 2)  # type: ignore[attr-defined]
    queue.cancel(a)
    assert b.positions[-1] == (0, 1)  # type: ignore[attr-defined]


def test_expired_tickets_leave_without_reaching_a_worker() -> None:
    clock = Clock()
    queue = JobQueue(max_queue=10, clock=clock)
    soon, later = ticket("soon", deadline=101.0), ticket("later", deadline=200.0)
    queue.submit(soon)
    queue.submit(later)
    clock.now = 150.0
    assert names(queue.expire()) == ["soon"]
    assert names(queue.take(first, timeout=0)) == ["later"]


def test_cancel_only_removes_queued_tickets() -> None:
    queue = JobQueue(max_queue=10)
    a = ticket("a")
    queue.submit(a)
    assert queue.take(first, timeout=0) == [a]
    assert queue.cancel(a) is False  # already running: the worker stops it at the next step instead
    b = ticket("b")
    queue.submit(b)
    assert queue.cancel(b) is True and queue.depth() == 0


def test_batch_takes_same_key_tickets_within_the_weight_limit() -> None:
    queue = JobQueue(max_queue=10)
    weights = {"a": 1, "x": 1, "b": 2, "c": 1, "d": 1}  # e.g. number_results of each request
    for name, key in [("a", "k"), ("x", "other"), ("b", "k"), ("c", "k"), ("d", "k")]:
        queue.submit(ticket(name, batch_key=key))
    batch = queue.take(first, max_batch=4, weight=lambda t: weights[t.payload], timeout=0)
    assert names(batch) == ["a", "b", "c"]  # a(1) + b(2) + c(1) = 4; d would exceed; x has another key
    assert names(queue.snapshot()) == ["x", "d"]


def test_blocked_tickets_wait_until_unblocked() -> None:
    queue = JobQueue(max_queue=10)
    downloading = ticket("downloading", blocked=True)
    ready = ticket("ready")
    queue.submit(downloading)
    queue.submit(ready)
    assert names(queue.take(first, timeout=0)) == ["ready"]
    assert queue.take(first, timeout=0) == []
    queue.unblock(downloading)
    assert names(queue.take(first, timeout=0)) == ["downloading"]


def test_take_blocks_until_work_arrives_and_close_releases_waiters() -> None:
    queue = JobQueue(max_queue=10)
    got: list[list[Entry]] = []
    worker = threading.Thread(target=lambda: got.append(queue.take(first)))
    worker.start()
    queue.submit(ticket("a"))
    worker.join(timeout=5)
    assert names(got[0]) == ["a"]
    waiter = threading.Thread(target=lambda: got.append(queue.take(first)))
    waiter.start()
    left = queue.close()
    waiter.join(timeout=5)
    assert left == [] and got[1] == []
    with pytest.raises(Overloaded):
        queue.submit(ticket("late"))


def test_choose_can_skip_the_head_for_affinity() -> None:
    queue = JobQueue(max_queue=10)
    for name, pair in [("a1", "A"), ("b1", "B"), ("a2", "A")]:
        queue.submit(ticket(name, pair=pair))
    prefer_b = queue.take(lambda ts: next((t for t in ts if t.pair == "B"), None), timeout=0)
    assert names(prefer_b) == ["b1"]
    assert queue.waiting_pairs() == {"A"}
