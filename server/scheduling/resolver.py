"""Turning a request's AIRs into cached, measured models while it waits in the queue.

On the resolver's threads: each model is leased in the cache first (so that from this moment until the request
ends, nothing evicts or deletes it: not another request's download, not an operator's pull under quota
pressure), then resolved (downloading if needed, reported as `ModelLoading` DOWNLOADING events), checked for
its role, and measured (its components' sizes and fingerprints, reported as VERIFYING the first time). A model
that is unknown, of the wrong architecture, or unsafe ends the request here, before it costs a device anything.
"""

from __future__ import annotations

import threading
import time

from modelstore import AIR, DownloadCause, DownloadProgress, ModelStore, Role, require_lora, require_role
from server.core.domain import Job, LoadPhase, LoraSpec, ModelLoading, PairKey
from server.generation import LoraFile, StageLoras
from server.scheduling.leases import LeaseSet
from server.scheduling.pairs import ModelSpec, PairSpec
from server.scheduling.ticket import EventSink

# Progress events while downloading: at most this often per request (the last one is always sent).
_DOWNLOAD_EVENT_S = 0.25


class Resolver:
    def __init__(self, store: ModelStore) -> None:
        self._store = store

    def pair_spec(
        self,
        key: PairKey,
        leases: LeaseSet,
        *,
        cause: DownloadCause,
        sink: EventSink | None = None,
        give_up: threading.Event | None = None,
    ) -> PairSpec:
        """Lease, resolve and measure the pair's models (blocking), downloading for `cause` (a request only as
        the store's on-demand policy allows). A request cancelled meanwhile sets `give_up`, which stops a
        download nobody else waits for."""
        specs = [self._model_spec(model, role, leases, sink, give_up, cause) for role, model in key.roles()]
        return PairSpec(key, specs[0], specs[1] if len(specs) > 1 else None)

    def loras(
        self,
        job: Job,
        spec: PairSpec,
        leases: LeaseSet,
        *,
        cause: DownloadCause,
        sink: EventSink | None = None,
        give_up: threading.Event | None = None,
    ) -> StageLoras:
        """Lease and resolve each stage's LoRAs (downloading as for the models) and check that each fits its
        stage's model: a checkpoint named as a LoRA, or a LoRA trained for another architecture or the other
        stage's UNet, ends the request here."""

        def stage(specs: tuple[LoraSpec, ...], prefix: str, model: ModelSpec | None) -> tuple[LoraFile, ...]:
            files = []
            for i, lora in enumerate(specs):
                assert model is not None, "validation gives refiner LoRAs only with a refiner"
                field = f"{prefix}loras[{i}].model"
                leases.hold(lora.model)
                progress = None if sink is None else _DownloadReporter(lora.model, Role.LORA, sink)
                record = self._store.resolve(lora.model, progress=progress, give_up=give_up, cause=cause)
                require_lora(record, model.record.architecture, field=field)
                files.append(LoraFile(lora, record.path, record.sha256, field))
            return tuple(files)

        refiner = job.refiner.loras if job.refiner is not None else ()
        return StageLoras(stage(job.loras, "", spec.base), stage(refiner, "refiner.", spec.refiner))

    def _model_spec(
        self,
        model: AIR,
        role: Role,
        leases: LeaseSet,
        sink: EventSink | None,
        give_up: threading.Event | None,
        cause: DownloadCause,
    ) -> ModelSpec:
        leases.hold(model)
        progress = None if sink is None else _DownloadReporter(model, role, sink)
        record = self._store.resolve(model, progress=progress, give_up=give_up, cause=cause)
        require_role(record, role)
        return ModelSpec(record, role, self._store.components(record, progress))


class _DownloadReporter:
    """Turns the store's progress into `ModelLoading` DOWNLOADING (or VERIFYING: bytes being read to hash or
    measure them) events, a few per second."""

    def __init__(self, model: AIR, role: Role, sink: EventSink) -> None:
        self._model, self._role, self._sink = model, role, sink
        self._last = 0.0

    def __call__(self, progress: DownloadProgress) -> None:
        now = time.monotonic()
        if not progress.finished and now - self._last < _DOWNLOAD_EVENT_S:
            return
        self._last = now
        self._sink.emit(
            ModelLoading(
                self._model,
                self._role,
                LoadPhase.VERIFYING if progress.verifying else LoadPhase.DOWNLOADING,
                bytes_done=progress.bytes_done,
                bytes_total=progress.bytes_total or 0,
                bytes_per_second=progress.rate_bps,
            )
        )
