"""Pinning pairs on every device (`--pin`, PinPair): all of them or none newly pinned."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future

from modelstore import ModelStore
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
    thread."""
    leases = LeaseSet(store)  # held until every device has loaded them
    specs: list[PairSpec] = []
    try:
        specs = [resolver.pair_spec(key, leases) for key in pairs]
        for spec in specs:
            if too_small := admission.too_small(spec):  # a pin holds the pair on every device
                w = too_small[0]
                raise OutOfDeviceMemory(
                    f"{spec.key} cannot fit on {w.device.name} beside the pairs pinned there "
                    f"(budget {format_bytes(w.residency.budget_bytes)})"
                )
        futures = [w.pin(spec) for w in workers for spec in specs]
        failures = [f.exception() for f in futures]  # every load ends before any rollback
        for failure in failures:
            if failure is not None:
                raise failure
    except BaseException as exc:
        for spec in specs:
            if spec.key not in pinned_before:
                unpin(spec.key)
        done.set_exception(exc)
    else:
        done.set_result(None)
    finally:
        leases.release_all()
