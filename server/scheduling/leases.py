"""The models one request holds in the cache, from the moment it resolves them until it ends."""

from __future__ import annotations

import threading
from typing import Protocol

from modelstore import AIR
from server.core.errors import JobCancelled


class Leases(Protocol):
    """The model cache's leases (`ModelStore.acquire` / `release`): a leased model is never evicted from the
    cache or deleted, by this process or any other sharing the cache."""

    def acquire(self, model: AIR) -> object: ...

    def release(self, model: AIR) -> None: ...


class LeaseSet:
    """The models one request holds in the cache, released together when it ends. Thread-safe: the resolver
    adds while the request may already be ending (a cancellation); once released, `hold` refuses with
    JobCancelled, which stops the resolution."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases
        self._lock = threading.Lock()
        self._held: list[AIR] = []
        self._released = False

    def hold(self, model: AIR) -> None:
        with self._lock:
            if self._released:
                raise JobCancelled("the request ended while its models were resolved")
            self._leases.acquire(model)
            self._held.append(model)

    def release_all(self) -> None:
        with self._lock:
            self._released = True
            held, self._held = self._held, []
        for model in held:
            self._leases.release(model)
