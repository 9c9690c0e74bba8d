"""Download (and local hashing) progress: the value every waiter sees, and the fan-out that delivers it.

One download may have many waiters (every request for a model that is being fetched joins the same flight),
so progress is produced once and handed to every subscriber, including those that join late: they get the
latest snapshot at once, then every later one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

# Callbacks are called at most this often (plus once per finished file and once at the end): a 6 GB download
# in 1 MiB chunks would otherwise call every waiter 6,000 times.
_MIN_INTERVAL_S = 0.1
# The rate is measured over this trailing window, so it follows the link's speed rather than the average
# since the start (which a resumed download would distort).
_RATE_WINDOW_S = 3.0


@dataclass(frozen=True)
class DownloadProgress:
    """Where one model's download stands. Byte counts cover the files that had to be fetched, or, when
    `verifying`, the local bytes being read to hash them (registering a local model, or measuring a model's
    components the first time it is used): no download, but a wait the caller should see."""

    model: str  # canonical AIR
    file: str  # the file being transferred (a label for people, never a path)
    bytes_done: int
    bytes_total: int  # may grow once the server states exact sizes
    rate_bps: float  # bytes per second over the last few seconds
    finished: bool = False
    verifying: bool = False
    # What arrived over the network for this download (in this process), never what an earlier, interrupted
    # attempt left on disk: `bytes_done` counts those too, so after a resumed download the two differ.
    bytes_transferred: int = 0


ProgressCallback = Callable[[DownloadProgress], None]


class ProgressFanout:
    """Accumulates byte counts from one downloader thread and delivers snapshots to every subscriber."""

    def __init__(self, model: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._model = model
        self._clock = clock
        self._lock = threading.Lock()
        # Serialises deliveries so each subscriber sees snapshots in order, including its first one.
        self._deliver_lock = threading.RLock()
        self._subscribers: list[ProgressCallback] = []
        self._file = ""
        self._verifying = False
        self._counted = False
        self._done = 0
        self._received = 0
        self._total = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._last_emit = float("-inf")
        self._latest: DownloadProgress | None = None

    def subscribe(self, callback: ProgressCallback) -> None:
        with self._deliver_lock:
            with self._lock:
                self._subscribers.append(callback)
                latest = self._latest
            if latest is not None:
                self._call(callback, latest)

    @property
    def counted(self) -> bool:
        """Whether anything was counted yet (a total or bytes)."""
        with self._lock:
            return self._counted

    def set_total(self, total: int) -> None:
        with self._lock:
            self._total = total
            self._counted = True

    def set_verifying(self) -> None:
        """From here on the bytes counted are read from local files to be hashed, not downloaded."""
        with self._lock:
            self._verifying = True

    def adjust_total(self, delta: int) -> None:
        """Correct the total once a server states a file's exact size (civitai publishes sizes in KB)."""
        with self._lock:
            self._total += delta

    def start_file(self, label: str) -> None:
        with self._lock:
            self._file = label
        self._emit(force=True)

    def advance(self, nbytes: int, *, received: bool = False) -> None:
        """`nbytes` more are done (negative: taken back); `received`: they just arrived over the network."""
        with self._lock:
            self._done += nbytes
            if received:
                self._received += nbytes
            self._counted = True
        self._emit(force=False)

    def finish(self) -> None:
        with self._lock:
            self._total = max(self._total, self._done)
        self._emit(force=True, finished=True)

    def _emit(self, *, force: bool, finished: bool = False) -> None:
        now = self._clock()
        with self._lock:
            if not force and now - self._last_emit < _MIN_INTERVAL_S:
                return
            self._last_emit = now
            self._samples.append((now, self._done))
            while len(self._samples) > 2 and now - self._samples[0][0] > _RATE_WINDOW_S:
                self._samples.popleft()
            t0, d0 = self._samples[0]
            rate = (self._done - d0) / (now - t0) if now > t0 else 0.0
            snapshot = DownloadProgress(
                self._model, self._file, self._done, self._total, rate, finished, self._verifying, self._received
            )
            self._latest = snapshot
            subscribers = list(self._subscribers)
        with self._deliver_lock:
            for callback in subscribers:
                self._call(callback, snapshot)

    def _call(self, callback: ProgressCallback, snapshot: DownloadProgress) -> None:
        # A failing subscriber (a client that went away) must not abort a download others are waiting for.
        try:
            callback(snapshot)
        except Exception:
            log.exception("progress callback for %s failed; the download continues", self._model)


class ByteCounter(Protocol):
    """What a long read reports to (a `ProgressFanout` is one): the bytes it will read, then as it reads."""

    def set_total(self, total: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...
