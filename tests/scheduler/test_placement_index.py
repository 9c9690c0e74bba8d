"""Placement through the queue's index decides exactly as the scan it replaced (placement_before.py, the code
before it): randomised queues run through both side by side (priorities, pairs resolved to one or two sets of
files, deadlines that pass with or without the reaper and a decision clock that reads earlier, blocked requests,
cancels, batch keys and image counts, devices that hold pairs, busy or idle, under budgets), and every choice,
batch, expiry, announced position and view must agree. Then: a decision asks about each group of alike requests
once, however many wait."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import pytest

from server.core.domain import PairKey
from server.core.errors import Overloaded
from server.scheduling import placement
from server.scheduling.queue import AdmissionQueue, Runnable, Waiting
from tests.scheduler import placement_before as before


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Spec:
    """A resolved pair as placement reads it: its key, and its size (what loads and fits are measured on)."""

    key: PairKey
    size: int


@dataclass(eq=False)
class Request:
    name: str
    spec: Spec
    images: int  # the batch weight

    def __repr__(self) -> str:
        return self.name


@dataclass
class Residency:
    """Holds pairs of given sizes under a budget; pairs in use (`active`) or protected are never evicted; loading
    costs the pair's size less what this device already shares with it (`shared`)."""

    budget: int
    held: dict[PairKey, int] = field(default_factory=dict)
    active: set[PairKey] = field(default_factory=set)
    shared: int = 0
    asked: int = 0

    def holds(self, key: PairKey) -> bool:
        self.asked += 1
        return key in self.held

    def load_cost(self, spec: Spec) -> int:
        self.asked += 1
        return 0 if spec.key in self.held else max(0, spec.size - self.shared)

    def fits(self, spec: Spec, protected: set[PairKey]) -> bool:
        self.asked += 1
        if spec.key in self.held:
            return True
        free = self.budget - sum(self.held.values())
        evictable = sum(size for key, size in self.held.items() if key not in self.active and key not in protected)
        return spec.size <= free + evictable


@dataclass
class Device:
    residency: Residency
    busy: bool = False


def pairs_of(count: int) -> list[PairKey]:
    return [PairKey.parse(f"civitai:{i}@1" + ("+civitai:999@1" if i % 2 else "")) for i in range(count)]


def random_devices(rng: random.Random, specs: list[Spec]) -> tuple[Device, list[Device]]:
    devices = []
    for _ in range(rng.randint(1, 3)):
        residency = Residency(budget=rng.randint(4, 24), shared=rng.randint(0, 3))
        for spec in rng.sample(specs, rng.randint(0, min(3, len(specs)))):
            residency.held[spec.key] = spec.size
        residency.active = {key for key in residency.held if rng.random() < 0.3}
        devices.append(Device(residency, busy=rng.random() < 0.4))
    return devices[0], devices[1:]


class SideBySide:
    """The queue and placement before and after, fed the same operations; each answer is compared."""

    def __init__(self, rng: random.Random, *, pairs: int, max_queue: int) -> None:
        self.rng = rng
        self.clock = Clock()
        self.before = before.AdmissionQueue[Request](max_queue, clock=self.clock)
        self.after = AdmissionQueue[Request](max_queue, clock=self.clock, group=placement.group)
        self.specs = [Spec(key, rng.randint(1, 12)) for key in pairs_of(pairs) for _ in range(rng.randint(1, 2))]
        self.heard: dict[str, list[tuple[Request, int, int]]] = {"before": [], "after": []}
        self.requests: list[Request] = []
        self.seen = {"not the first": 0, "none": 0, "batch": 0, "lapsed": 0, "expired": 0, "full": 0}

    def submit(self) -> None:
        rng = self.rng
        spec = rng.choice(self.specs)
        request = Request(f"r{len(self.requests)}", spec, images=rng.choice([1, 1, 2, 3]))
        self.requests.append(request)
        deadline = None if rng.random() < 0.5 else self.clock.now + rng.uniform(-2, 30)
        options = {
            "priority": rng.choice([-1, 0, 0, 1, 2]),
            "batch_key": rng.choice([None, (spec.key, 1), (spec.key, 2)]),
            "pair": spec.key,
            "deadline": deadline,
            "blocked": rng.random() < 0.3,
        }
        listens = rng.random() < 0.8
        outcomes = []
        for name, queue in [("before", self.before), ("after", self.after)]:
            heard = self.heard[name]
            on_position = (lambda p, d, heard=heard: heard.append((request, p, d))) if listens else None
            try:
                queue.submit(request, on_position=on_position, **options)  # type: ignore[arg-type]
                outcomes.append("queued")
            except Overloaded as exc:
                outcomes.append(f"refused {exc.retry_after_s}")
        assert outcomes[0] == outcomes[1]
        self.seen["full"] += outcomes[0] != "queued"

    def take(self, pick: str) -> None:
        rng = self.rng
        device, peers = random_devices(rng, self.specs)
        now = self.clock.now + (rng.uniform(-10, 10) if rng.random() < 0.3 else 0.0)
        options = {"max_batch": rng.randint(1, 4), "weight": lambda r: r.images, "timeout": 0}
        if pick == "placement":
            runnable = [w for w in self.before._waiting if not w.blocked]
            old = self.before.take(lambda ws: before.choose(device, peers, ws, now), **options)  # type: ignore[arg-type]
            new = self.after.take(lambda r: placement.choose(device, peers, r, now), **options)  # type: ignore[arg-type]
            self._count(runnable, old, now)
        else:
            old = self.before.take(_first_of_pair(pick), **options)  # type: ignore[arg-type]
            new = self.after.take(_first_of_pair(pick), **options)  # type: ignore[arg-type]
        assert old == new

    def _count(self, runnable: list[before.Waiting[Request]], taken: list[Request], now: float) -> None:
        self.seen["lapsed"] += any(w.deadline is not None and w.deadline <= now for w in runnable)
        if not taken:
            self.seen["none"] += bool(runnable)
            return
        self.seen["batch"] += len(taken) > 1
        self.seen["not the first"] += runnable[0].item is not taken[0]

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            self.submit()
        elif roll < 0.5 and self.requests:
            request = rng.choice(self.requests)
            self.before.unblock(request)
            self.after.unblock(request)
        elif roll < 0.6 and self.requests:
            request = rng.choice(self.requests)
            assert self.before.cancel(request) == self.after.cancel(request)
        elif roll < 0.7:
            self.clock.now += rng.uniform(0, 6)
            expired = self.before.expire()
            assert expired == self.after.expire()
            self.seen["expired"] += bool(expired)
        elif roll < 0.95:
            self.take("placement")
        else:
            self.take(rng.choice(["first", str(rng.choice(self.specs).key)]))
        self.check()

    def check(self) -> None:
        old, new = self.before, self.after
        assert old.snapshot() == new.snapshot()
        assert old.depth() == new.depth()
        assert list(old.depth_by_priority().items()) == list(new.depth_by_priority().items())
        assert old.waiting_pairs() == new.waiting_pairs()
        assert old.retry_after_s() == new.retry_after_s()
        assert self.heard["before"] == self.heard["after"]


def _first_of_pair(pick: str) -> Callable[[list[Waiting[Request]]], Waiting[Request] | None]:
    """A chooser that is not placement: the first runnable request, or the first of one pair."""
    return lambda ws: next((w for w in ws if pick == "first" or str(w.pair) == pick), None)


def run_side_by_side(seeds: range, *, pairs: tuple[int, int], max_queue: tuple[int, int], steps: int) -> dict[str, int]:
    seen: dict[str, int] = {}
    for seed in seeds:
        rng = random.Random(seed)
        both = SideBySide(rng, pairs=rng.randint(*pairs), max_queue=rng.randint(*max_queue))
        for step in range(steps):
            try:
                both.step()
            except AssertionError as exc:
                raise AssertionError(f"seed {seed}, step {step}: before and after disagree") from exc
        for name, count in both.seen.items():
            seen[name] = seen.get(name, 0) + count
        both.before.close()
        both.after.close()
    return seen


def test_randomised_queues_are_placed_batched_and_announced_as_before() -> None:
    seen = run_side_by_side(range(300), pairs=(1, 6), max_queue=(6, 40), steps=200)
    # The runs reached every rule: a request past the head taken for affinity or load cost, nothing worth
    # taking while requests wait, batches, requests past their deadline before the reaper, and a full queue.
    assert all(count > 0 for count in seen.values()), seen


def test_long_queues_of_many_pairs_are_placed_as_before() -> None:
    seen = run_side_by_side(range(1000, 1006), pairs=(20, 40), max_queue=(400, 400), steps=1500)
    assert seen["not the first"] > 0 and seen["none"] > 0, seen


def test_requests_of_one_pair_resolved_to_other_files_are_placed_each_on_its_own() -> None:
    # The same pair resolved twice (a model pulled again in between): the first request's files do not fit on
    # this device, the second's do, so the second is taken, as the scan did.
    key = pairs_of(1)[0]
    queue = AdmissionQueue[Request](10, group=placement.group)
    large, small = Request("large", Spec(key, 20), 1), Request("small", Spec(key, 5), 1)
    for request in (large, small):
        queue.submit(request, pair=key)
    device = Device(Residency(budget=10))
    taken = queue.take(lambda r: placement.choose(device, [], r, 0.0), timeout=0)  # type: ignore[arg-type]
    assert taken == [small]


def _asked_per_decision(per_group: int) -> int:
    """Residency questions in one decision over 6 groups of `per_group` requests each, none worth loading: the
    scan asked about every request; the index asks about the first of each group."""
    specs = [Spec(key, 30) for key in pairs_of(6)]
    queue = AdmissionQueue[Request](len(specs) * per_group, group=placement.group)
    for i in range(per_group):
        for spec in specs:
            queue.submit(Request(f"{spec.key}#{i}", spec, 1), priority=i % 3, pair=spec.key)
    device, peer = Device(Residency(budget=10)), Device(Residency(budget=10), busy=True)
    chosen: list[Waiting[Request] | None] = []

    def choose(runnable: Runnable[Request]) -> Waiting[Request] | None:
        chosen.append(placement.choose(device, [peer], runnable, 0.0))  # type: ignore[arg-type]
        return None

    assert queue.take(choose, timeout=0) == [] and chosen == [None]
    return device.residency.asked + peer.residency.asked


def test_a_decision_asks_the_same_questions_with_10000_requests_queued_as_with_60() -> None:
    assert _asked_per_decision(10) == _asked_per_decision(1667)


@pytest.mark.parametrize("group", [placement.group, None])
def test_a_generic_chooser_still_sees_every_runnable_request_in_queue_order(
    group: Callable[[Request], Hashable] | None,
) -> None:
    queue = AdmissionQueue[Request](10) if group is None else AdmissionQueue[Request](10, group=group)
    key = pairs_of(1)[0]
    requests = [Request(f"r{i}", Spec(key, 1), 1) for i in range(4)]
    for i, request in enumerate(requests):
        queue.submit(request, priority=i % 2, pair=key, blocked=i == 2)
    seen: list[list[Request]] = []
    queue.take(lambda ws: seen.append([w.item for w in ws]), timeout=0)  # type: ignore[func-returns-value]
    assert seen == [[requests[1], requests[3], requests[0]]]
