"""Single flight: one fetch per model in this process, however many callers want it at once.

The first caller for a model leads: it runs the fetch. Everyone who asks while it runs joins the flight,
hears the same progress (from its latest snapshot on), and gets the leader's record or its error. A caller
that gives up (its `give_up` event is set) leaves at once; the fetch itself stops only once every caller has
given up (`Flight.stop_if_abandoned`, called by the download between chunks), keeping what it received.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from modelstore.errors import DownloadAbandoned, ModelStoreError
from modelstore.progress import ProgressCallback, ProgressFanout
from modelstore.record import ModelRecord

# How soon a caller waiting on someone else's fetch notices that it gave up.
_GIVE_UP_POLL_S = 0.1


class Flight:
    """One model being fetched in this process, and everybody waiting for it."""

    def __init__(self, canonical: str) -> None:
        self.canonical = canonical
        self.progress = ProgressFanout(canonical)
        self.done = threading.Event()
        self.record: ModelRecord | None = None
        self.error: BaseException | None = None
        # One entry per caller: the event it sets when it gives up, or None for a caller that never does.
        self._wants: list[threading.Event | None] = []
        self._wants_lock = threading.Lock()

    def join(self, give_up: threading.Event | None) -> None:
        with self._wants_lock:
            self._wants.append(give_up)

    def abandoned(self) -> bool:
        """Whether every caller has given up: then nobody is left to use what the download would bring."""
        with self._wants_lock:
            return all(w is not None and w.is_set() for w in self._wants)

    def stop_if_abandoned(self) -> None:
        if self.abandoned():
            raise DownloadAbandoned(
                f"{self.canonical}: everyone waiting for it went away; the download stopped and the bytes "
                "received are kept for the next request"
            )


class Flights:
    """The flights of one store."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def __contains__(self, canonical: str) -> bool:
        with self._lock:
            return canonical in self._flights

    def run(
        self,
        canonical: str,
        fetch: Callable[[Flight], ModelRecord],
        progress: ProgressCallback | None,
        give_up: threading.Event | None,
    ) -> ModelRecord:
        """`fetch(flight)`'s record, run by this call or by the one already fetching `canonical`."""
        while True:
            with self._lock:
                flight = self._flights.get(canonical)
                leader = flight is None
                if flight is None:
                    flight = self._flights[canonical] = Flight(canonical)
                flight.join(give_up)
            if progress is not None:
                flight.progress.subscribe(progress)
            if leader:
                return self._lead(flight, fetch)
            record = self._follow(flight, give_up)
            if record is not None:
                return record
            # The others gave up and the fetch stopped just as this call joined it: start one again.

    def _lead(self, flight: Flight, fetch: Callable[[Flight], ModelRecord]) -> ModelRecord:
        try:
            flight.record = fetch(flight)
            return flight.record
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[flight.canonical]
            flight.done.set()

    def _follow(self, flight: Flight, give_up: threading.Event | None) -> ModelRecord | None:
        """Wait for another call's fetch and take its outcome as ours; None if it stopped because everyone
        else gave up while this call still wants the model."""
        while not flight.done.wait(None if give_up is None else _GIVE_UP_POLL_S):
            if give_up is not None and give_up.is_set():
                raise DownloadAbandoned(f"{flight.canonical}: gave up waiting for its download")
        if isinstance(flight.error, DownloadAbandoned) and not (give_up is not None and give_up.is_set()):
            return None
        if isinstance(flight.error, ModelStoreError):
            raise flight.error.about(flight.canonical)  # each waiter raises its own value (tracebacks are per raise)
        if flight.error is not None:
            raise flight.error
        assert flight.record is not None
        return flight.record
