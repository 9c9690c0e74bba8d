"""How fast this server gets through work, learnt from the batches it ran: to refuse at admission a request
whose deadline cannot be met, instead of running it for nobody."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from server.core.errors import DeadlineExceeded, Overloaded

# A request ahead of another: its work still to do (megapixel-steps), and the seconds until its own deadline
# (None: it has none). It holds a device no longer than either.
Ahead = tuple[float, float | None]


class Pace:
    """Megapixel-steps per second of one device, as an exponentially weighted mean of finished batches. Until
    the first batch finishes nothing is known and nothing is refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rate: float | None = None

    def observe(self, work: float, seconds: float) -> None:
        if work <= 0 or seconds <= 0:
            return
        rate = work / seconds
        with self._lock:
            self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate

    def seconds_for(self, work: float) -> float | None:
        with self._lock:
            return None if self._rate is None else work / self._rate

    def check(self, own: float, ahead: Iterable[Ahead], devices: int, remaining_s: float) -> None:
        """Refuse a request of `own` work with the requests `ahead` of it (running, or queued before it),
        `remaining_s` before its deadline: DEADLINE_EXCEEDED when its own work alone cannot finish in time (no
        retry helps), else RESOURCE_EXHAUSTED with a retry delay when those ahead of it make it late (later,
        or another replica, may do)."""
        alone = self.seconds_for(own)
        if alone is None:
            return
        if alone > remaining_s:
            raise DeadlineExceeded(
                f"the request needs about {alone:.1f}s of a device here; its deadline leaves {remaining_s:.1f}s"
            )
        busy = 0.0
        for work, until_deadline in ahead:
            seconds = self.seconds_for(work) or 0.0
            busy += seconds if until_deadline is None else max(0.0, min(seconds, until_deadline))
        waiting = busy / max(devices, 1)
        if alone + waiting > remaining_s:
            raise Overloaded(
                f"the requests ahead of it need about {waiting:.1f}s; with this one's {alone:.1f}s its deadline "
                f"({remaining_s:.1f}s away) would pass",
                retry_after_s=max(1.0, round(waiting, 1)),
            )
