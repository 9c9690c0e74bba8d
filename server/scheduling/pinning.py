"""Pinning pairs on every device (`--pin`, PinPair): all of them or none newly pinned."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError

from modelstore import Cause, DownloadCause, ModelStore
from modelstore.units import format_bytes
from server.core.domain import PairKey
from server.core.errors import OutOfDeviceMemory
from server.scheduling.admission import Admission
from server.scheduling.leases import LeaseSet
from server.scheduling.pairs import PairSpec
from server.scheduling.resolver import Resolver
from server.scheduling.worker import DeviceWorker


def pin_everywhere(
    pairs: Sequence[PairKey],
    pinned_before: set[PairKey],
    *,
    store: ModelStore,
    resolver: Resolver,
    admission: Admission,
    workers: Sequence[DeviceWorker],
    unpin: Callable[[PairKey], bool],
    done: Future[None],
) -> None:
    """Resolve `pairs`, load each on every device and pin it there; settle `done` with None, or with the first
    error after unpinning those of `pairs` not in `pinned_before` (taken when the call arrived). A pair that
    cannot fit beside the pairs already pinned on some device is refused before anything loads. Runs on its own
    thread, which never dies of its caller: a caller that gives up cancels `done`, and then nothing stays newly
    pinned (loads already under way finish, and are unpinned)."""
    leases = LeaseSet(store)  # held until every device has loaded them
    specs: list[PairSpec] = []
    try:
        give_up = threading.Event()  # a download for a caller who left stops
        done.add_done_callback(lambda settled: give_up.set() if settled.cancelled() else None)
        pin = DownloadCause(Cause.PIN)
        specs = [resolver.pair_spec(key, leases, cause=pin, give_up=give_up) for key in pairs]
        for spec in specs:
            if too_small := admission.too_small(spec):  # a pin holds the pair on every device
                w = too_small[0]
                raise OutOfDeviceMemory(
                    f"{spec.key} cannot fit on {w.device.name} beside the pairs pinned there "
                    f"(budget {format_bytes(w.residency.budget_bytes)})"
                )
        if done.cancelled():
            return  # abandoned before anything loaded
        futures = [w.pin(spec) for w in workers for spec in specs]
        failures = [f.exception() for f in futures]  # every load ends before any rollback
        for failure in failures:
            if failure is not None:
                raise failure
    except BaseException as exc:
        _roll_back(specs, pinned_before, unpin)
        _settle(done, exc)
    else:
        if not _settle(done, None):  # abandoned while the pairs loaded: nothing stays newly pinned
            _roll_back(specs, pinned_before, unpin)
    finally:
        leases.release_all()


def _settle(done: Future[None], error: BaseException | None) -> bool:
    """Settle `done` with `error` (None: success); False when its caller cancelled it first."""
    try:
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
    except InvalidStateError:  # cancelled: set_* refuse a settled future
        return False
    return True


def _roll_back(specs: Sequence[PairSpec], pinned_before: set[PairKey], unpin: Callable[[PairKey], bool]) -> None:
    for spec in specs:
        if spec.key not in pinned_before:
            unpin(spec.key)
