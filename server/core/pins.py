"""Pinned pairs (`--pin`) that could not be loaded at start-up, and why.

A server whose pinned model is damaged, missing offline, or refused still starts (issue 13, finding 3): it logs
each failure, reports it in `GetStatus` (`pin_failures`), and serves every other pair. A pair leaves the list
once a `PinPair` call loads it. Readiness: SERVING once at least one pinned pair is resident; when every
pinned pair failed, the server stays NOT_SERVING (live, and answering calls that reach it) until a `PinPair`
succeeds, because a balancer should not send it the traffic of the pairs it was deployed to hold.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from server.core.domain import PairKey


@dataclass(frozen=True)
class PinFailure:
    pair: PairKey
    error: BaseException


class PinFailures:
    """Thread-safe: recorded by the start-up, read by GetStatus, cleared by PinPair."""

    def __init__(self) -> None:
        self._failures: dict[PairKey, BaseException] = {}
        self._lock = threading.Lock()

    def record(self, pair: PairKey, error: BaseException) -> None:
        with self._lock:
            self._failures[pair] = error

    def clear(self, pair: PairKey) -> None:
        """Forget `pair`'s failure (it is pinned now)."""
        with self._lock:
            self._failures.pop(pair, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._failures)

    def snapshot(self) -> list[PinFailure]:
        with self._lock:
            return [PinFailure(pair, error) for pair, error in self._failures.items()]
