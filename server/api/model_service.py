"""The `refinery.v1.ModelService` servicer (grpc.aio): the model cache, for operators.

Models here are checkpoints or LoRAs (`parse_stored_air`: an URN typed `lora` is accepted as well as one typed
`checkpoint`); listings say which (`kind`) and a LoRA's trigger words.

- `PullModel` fetches a model into the cache (or finds it there), streaming `PullProgress` while bytes arrive
  and then the model's `ModelInfo`; `pin` exempts it from the quota's eviction.
- `ListModels` lists the cache: every model, the bytes it holds and the quota.
- `DeleteModel` removes a model; refused with FAILED_PRECONDITION while it is in use: leased in the store (a
  request or a pull holds it) or loaded on a device (`resident_models`, which whoever runs requests provides).
- `PinModel` / `UnpinModel` exempt a cached model from the quota's eviction, or not.
- `VerifyModel` reads cached models in full and checks every file's SHA256, streaming progress and then one
  result per model; a file that fails is set aside and the model fetched again where its source allows.

On a read-only cache (`REFINERY_CACHE_READ_ONLY`: a shared volume filled elsewhere) nothing is written: a pull
of a model the volume holds answers its record, but a pull of one it lacks, a pull with `pin`, `DeleteModel`,
`PinModel` and `UnpinModel` are refused with FAILED_PRECONDITION (`ReadOnlyCache`); `VerifyModel` reads and
reports a damaged model CORRUPT, to be pulled again where the volume is filled.

Errors map to statuses through `boundary.py`; model errors name the request field `model`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import grpc

from modelstore import AIR, CachedModel, DownloadProgress, ModelStore, Verification, parse_stored_air
from modelstore.errors import ModelInUse, ReadOnlyCache
from refinery.v1 import models_pb2 as pb
from refinery.v1 import models_pb2_grpc as pb_grpc
from server.api import local_models
from server.api.boundary import ModelField, rpc
from server.api.convert import model_info, pull_progress, verify_result
from server.api.stream import Channel
from server.core.logs import quoted

SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"]
SERVICE_NAME = SERVICE.full_name
T = TypeVar("T")

# Canonical AIRs of the models loaded on any device right now. Called on the event loop: it must be quick
# and must not block.
ResidentModels = Callable[[], AbstractSet[str]]


def nothing_resident() -> AbstractSet[str]:
    return frozenset()


class _NamesAModel(Protocol):
    model: str


def _model_field(_servicer: object, request: _NamesAModel) -> Sequence[ModelField]:
    return (ModelField("model", request.model),)


def _target(request: _NamesAModel) -> str:
    return quoted(request.model)  # the client's text: escaped and cut to a bounded length


class ModelService(pb_grpc.ModelServiceServicer):
    def __init__(
        self,
        store: ModelStore,
        *,
        resident_models: ResidentModels = nothing_resident,
        local_roots: Sequence[Path] = (),
    ) -> None:
        self._store = store
        self._resident_models = resident_models
        self._local_roots = tuple(local_roots)

    @rpc("PullModel", describe=_target, models=_model_field)
    async def PullModel(
        self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullModelResponse]:
        local_models.canonicalize(request, ("model",), self._local_roots)
        if request.pin:
            self._writable("pinning", request.model)
        async for event in _pull(self._store, parse_stored_air(request.model), pin=request.pin).events():
            if isinstance(event, DownloadProgress):
                yield pull_progress(event)
            else:
                yield pb.PullModelResponse(model=self._info(event))

    @rpc("VerifyModel", describe=_target, models=_model_field)
    async def VerifyModel(
        self, request: pb.VerifyModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.VerifyModelResponse]:
        # Only models already in the cache are read: a path is never registered here (local models are skipped).
        # A path outside the local-model roots gets the same refusal as everywhere else.
        local_models.canonicalize(request, ("model",), self._local_roots)
        models = [parse_stored_air(request.model)] if request.model else None
        async for event in _verify(self._store, models).events():
            if isinstance(event, DownloadProgress):
                yield pb.VerifyModelResponse(progress=pull_progress(event).progress)
            else:
                yield pb.VerifyModelResponse(result=verify_result(event))

    @rpc("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        # SQLite reads and a stat per file: off the event loop.
        models = await asyncio.to_thread(self._store.list_models)
        used = await asyncio.to_thread(self._store.used_bytes)
        resident = self._resident_models()
        return pb.ListModelsResponse(
            models=[model_info(m, resident=m.air in resident) for m in models],
            total_bytes=used,
            quota_bytes=self._store.settings.max_bytes,
        )

    @rpc("DeleteModel", describe=_target, models=_model_field)
    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteModelResponse:
        air = parse_stored_air(request.model)
        self._writable("deleting", air.canonical)
        # The store refuses models that are leased; this covers a device that loaded a model without holding
        # a lease on it.
        if air.canonical in self._resident_models():
            raise ModelInUse(f"{air.canonical} is loaded on a device and cannot be deleted now", air=air.canonical)
        freed = await asyncio.to_thread(self._store.delete, air)
        return pb.DeleteModelResponse(freed_bytes=freed)

    @rpc("PinModel", describe=_target, models=_model_field)
    async def PinModel(self, request: pb.PinModelRequest, context: grpc.aio.ServicerContext) -> pb.PinModelResponse:
        return pb.PinModelResponse(model=await self._set_pinned(request.model, pinned=True))

    @rpc("UnpinModel", describe=_target, models=_model_field)
    async def UnpinModel(
        self, request: pb.UnpinModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnpinModelResponse:
        return pb.UnpinModelResponse(model=await self._set_pinned(request.model, pinned=False))

    async def _set_pinned(self, model: str, *, pinned: bool) -> pb.ModelInfo:
        air = parse_stored_air(model)
        self._writable("pinning" if pinned else "unpinning", air.canonical)

        def update() -> CachedModel:
            self._store.pin(air, pinned)  # ModelNotFound unless cached: pinning never downloads
            return self._store.describe(air)

        return self._info(await asyncio.to_thread(update))

    def _writable(self, what: str, model: str) -> None:
        """ReadOnlyCache for `what` on a read-only cache: only where the shared volume is filled can it change."""
        if self._store.settings.read_only:
            raise ReadOnlyCache(
                f"{what} {model}: this server's model cache is read-only (REFINERY_CACHE_READ_ONLY); do it where "
                "the shared volume is filled (the pull Job: refinery models pull --pin / rm)",
                air=model,
            )

    def _info(self, model: CachedModel) -> pb.ModelInfo:
        return model_info(model, resident=model.air in self._resident_models())


def _pull(store: ModelStore, air: AIR, *, pin: bool) -> _Background[CachedModel]:
    """One PullModel call: progress while the pull runs, then the cached model."""

    def work(out: _Background[CachedModel], gave_up: threading.Event) -> None:
        # Leased: neither evicted (by another pull's quota) nor deleted between the download and the pin.
        with store.lease(air):
            record = store.pull(air, progress=out.progress, give_up=gave_up)
            # Measure it now (component sizes and fingerprints, what the scheduler budgets and shares with):
            # this reads the weights once more, which a pre-fetch should pay rather than the first Generate that
            # uses the model (about 7 s for a 7 GB checkpoint). A LoRA is no pipeline: nothing to measure.
            if not record.is_lora:
                store.components(record)
            if pin:
                store.pin(air)
            out.emit(store.describe(air))

    return _Background(f"pull-{air.canonical}", work)


def _verify(store: ModelStore, models: list[AIR] | None) -> _Background[Verification]:
    """One VerifyModel call: progress while files are read (and fetched again), a result per model. A client
    that goes away stops it after the model being read."""

    def work(out: _Background[Verification], gave_up: threading.Event) -> None:
        for verification in store.verify(models, progress=out.progress):
            out.emit(verification)
            if gave_up.is_set():
                return

    return _Background("verify", work)


class _Background(Generic[T]):
    """A blocking store call (`work`) on a thread, its progress and outcomes on the event loop.

    The thread is a daemon of its own rather than `asyncio.to_thread`: a pull can run for as long as a 7 GB
    download takes, and the default executor's threads are joined when the loop and the interpreter shut down,
    so `refinery serve` would not exit on SIGTERM until the download ended. A daemon dies with the process;
    its partial file is resumable like after a kill -9.

    A client that goes away gives up its interest (`work`'s event): the store stops a download (keeping the
    bytes for the next pull) unless another pull or a queued request still waits for the same model.
    """

    def __init__(self, name: str, work: Callable[[_Background[T], threading.Event], None]) -> None:
        # Unbounded: progress comes at most ten times a second, so a slow reader costs little.
        self._channel: Channel[DownloadProgress | T] = Channel()
        self._listening = True
        self._gave_up = threading.Event()
        thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        thread.start()

    def _run(self, work: Callable[[_Background[T], threading.Event], None]) -> None:
        try:
            work(self, self._gave_up)
        except BaseException as exc:
            self._channel.close(exc)
        else:
            self._channel.close(None)

    def progress(self, progress: DownloadProgress) -> None:
        if self._listening:
            self._channel.put(progress)

    def emit(self, outcome: T) -> None:
        self._channel.put(outcome)

    async def events(self) -> AsyncIterator[DownloadProgress | T]:
        """Progress and outcomes while the work runs; raises what it raised."""
        try:
            async for item in self._channel:
                yield item
        finally:
            self._listening = False
            self._gave_up.set()  # after the end, too: by then the store has nothing left to stop
