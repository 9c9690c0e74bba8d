"""Turning a request's AIRs into cached, measured models while it waits in the queue.

On the resolver's threads: each model is leased in the cache first (so that from this moment until the request
ends, nothing evicts or deletes it: not another request's download, not an operator's pull under quota
pressure), then resolved (downloading if needed, reported as `ModelLoading` DOWNLOADING events), checked for
its role, and measured (its components' sizes and fingerprints, reported as VERIFYING the first time). A model
that is unknown, of the wrong architecture, or unsafe ends the request here, before it costs a device anything;
so does a base that cannot serve the request's mode (an inpainting base without a mask).
"""

from __future__ import annotations

import threading
import time

from modelstore import AIR, DownloadCause, DownloadProgress, ModelStore, Role, needs_mask, require_lora, require_role
from server.core.domain import ImageMode, Job, LoadPhase, LoraSpec, ModelLoading, PairKey
from server.core.errors import DoesNotFit
from server.generation import LoraFile, StageLoras
from server.scheduling.leases import LeaseSet
from server.scheduling.pairs import ModelSpec, PairSpec
from server.scheduling.ticket import EventSink

# Progress events while downloading: at most this often per request (the last one is always sent).
_DOWNLOAD_EVENT_S = 0.25
_MODE_WORDS = {
    ImageMode.TEXT: "a text-to-image request",
    ImageMode.IMG2IMG: "an img2img request (an image without a mask)",
    ImageMode.INPAINT: "an inpainting request",
}


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
        stage's UNet, ends the request here. First of all, the base must suit the request's mode
        (`require_mode`): the one place that sees both the job and its resolved models, before any LoRA is
        fetched."""
        require_mode(job, spec)

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


def require_mode(job: Job, spec: PairSpec) -> None:
    """DoesNotFit (FAILED_PRECONDITION naming `model`) when the base cannot run the request's mode: an
    inpainting base's UNet reads a mask and a masked image beside the latent, which text-to-image and img2img
    requests do not have."""
    record = spec.base.record
    if needs_mask(record.architecture) and job.mode is not ImageMode.INPAINT:
        raise DoesNotFit(
            f"{record.canonical} is an {record.architecture.label} model: it needs image and mask, and this is "
            f"{_MODE_WORDS[job.mode]}",
            "model",
        )


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
