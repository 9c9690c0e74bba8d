"""How fast this server gets through work, learnt from the batches it ran: to refuse at admission a request
whose deadline cannot be met, instead of running it for nobody."""

from __future__ import annotations

import threading

from server.errors import DeadlineExceeded, Overloaded


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

    def check(self, own: float, ahead: float, devices: int, remaining_s: float) -> None:
        """Refuse a request of `own` work with `ahead` work queued before it, `remaining_s` before its
        deadline: DEADLINE_EXCEEDED when its own work alone cannot finish in time (no retry helps), else
        RESOURCE_EXHAUSTED with a retry delay when the queue ahead of it makes it late (later, or another
        replica, may do)."""
        alone = self.seconds_for(own)
        if alone is None:
            return
        if alone > remaining_s:
            raise DeadlineExceeded(
                f"the request needs about {alone:.1f}s of a device here; its deadline leaves {remaining_s:.1f}s"
            )
        waiting = (self.seconds_for(ahead) or 0.0) / max(devices, 1)
        if alone + waiting > remaining_s:
            raise Overloaded(
                f"the requests queued ahead need about {waiting:.1f}s; with this one's {alone:.1f}s its deadline "
                f"({remaining_s:.1f}s away) would pass",
                retry_after_s=max(1.0, round(waiting, 1)),
            )
