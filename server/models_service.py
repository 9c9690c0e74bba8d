"""The `refinery.v1.ModelService` servicer (grpc.aio): the model cache, for operators.

- `PullModel` fetches a model into the cache (or finds it there), streaming `PullProgress` while bytes arrive
  and then the model's `ModelInfo`; `pin` exempts it from the quota's eviction.
- `ListModels` lists the cache: every model, the bytes it holds and the quota.
- `DeleteModel` removes a model; refused with FAILED_PRECONDITION while it is in use: leased in the store (a
  job or a pull holds it) or loaded on a device (`resident_models`, which whoever runs the jobs provides).

Errors map to statuses through `server/status.py`; model errors name the request field `model`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import NoReturn

import grpc

from modelstore import AIR, ModelStore, parse_air
from modelstore.cache import CachedModel
from modelstore.components import components_of
from modelstore.errors import ModelInUse, ModelStoreError
from modelstore.progress import DownloadProgress
from refinery.v1 import models_pb2 as pb
from refinery.v1 import models_pb2_grpc as pb_grpc
from server.models_convert import model_info, pull_progress
from server.status import abort

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelService"].full_name

# Canonical AIRs of the models loaded on any device right now. Called on the event loop: it must be quick
# and must not block.
ResidentModels = Callable[[], AbstractSet[str]]


def nothing_resident() -> AbstractSet[str]:
    return frozenset()


class ModelService(pb_grpc.ModelServiceServicer):
    def __init__(self, store: ModelStore, *, resident_models: ResidentModels = nothing_resident) -> None:
        self._store = store
        self._resident_models = resident_models

    async def PullModel(
        self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullModelResponse]:
        try:
            air = _model(request.model)
            async for event in _Pull(self._store, air, pin=request.pin).events():
                if isinstance(event, DownloadProgress):
                    yield pull_progress(event)
                else:
                    yield pb.PullModelResponse(model=self._info(event))
            return
        except Exception as exc:  # CancelledError (client gone) is a BaseException and skips this
            error = exc
        await _abort(context, "PullModel", request.model, error)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        try:
            # SQLite reads and a stat per file: off the event loop.
            models = await asyncio.to_thread(self._store.list_models)
            used = await asyncio.to_thread(self._store.used_bytes)
            resident = self._resident_models()
            return pb.ListModelsResponse(
                models=[model_info(m, resident=m.air in resident) for m in models],
                total_bytes=used,
                quota_bytes=self._store.settings.max_bytes,
            )
        except Exception as exc:
            error = exc
        await _abort(context, "ListModels", None, error)

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteModelResponse:
        try:
            air = _model(request.model)
            # The store refuses models that are leased; this covers a device that loaded a model without
            # holding a lease on it.
            if air.canonical in self._resident_models():
                raise ModelInUse(f"{air.canonical} is loaded on a device and cannot be deleted now")
            freed = await asyncio.to_thread(self._store.delete, air)
            return pb.DeleteModelResponse(freed_bytes=freed)
        except Exception as exc:
            error = exc
        await _abort(context, "DeleteModel", request.model, error)

    async def PinModel(self, request: pb.PinModelRequest, context: grpc.aio.ServicerContext) -> pb.PinModelResponse:
        try:
            return pb.PinModelResponse(model=await self._set_pinned(request.model, pinned=True))
        except Exception as exc:
            error = exc
        await _abort(context, "PinModel", request.model, error)

    async def UnpinModel(
        self, request: pb.UnpinModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnpinModelResponse:
        try:
            return pb.UnpinModelResponse(model=await self._set_pinned(request.model, pinned=False))
        except Exception as exc:
            error = exc
        await _abort(context, "UnpinModel", request.model, error)

    async def _set_pinned(self, model: str, *, pinned: bool) -> pb.ModelInfo:
        air = _model(model)

        def update() -> CachedModel:
            self._store.pin(air, pinned)  # ModelNotFound unless cached: pinning never downloads
            return self._store.describe(air)

        return self._info(await asyncio.to_thread(update))

    def _info(self, model: CachedModel) -> pb.ModelInfo:
        return model_info(model, resident=model.air in self._resident_models())


def _model(text: str) -> AIR:
    return parse_air(text)  # InvalidModelId: INVALID_ARGUMENT, named `model` by _abort


async def _abort(context: grpc.aio.ServicerContext, method: str, model: str | None, error: Exception) -> NoReturn:
    """End the RPC with the status `server/status.py` gives `error`; `model`: the request's `model` field."""
    if model is not None and isinstance(error, ModelStoreError):
        error.for_field("model")
    # repr: the model text is the client's, as it was sent, control characters included.
    await abort(context, error, call=method if model is None else f"{method} {model!r}")


@dataclass(frozen=True)
class _Done:
    model: CachedModel | None
    error: BaseException | None


class _Pull:
    """One PullModel call: the store's blocking pull on a thread, its progress and outcome on the event loop.

    The thread is a daemon of its own rather than `asyncio.to_thread`: a pull can run for as long as a 7 GB
    download takes, and the default executor's threads are joined when the loop and the interpreter shut down,
    so `refinery serve` would not exit on SIGTERM until the download ended. A daemon dies with the process;
    its partial file is resumable like after a kill -9.

    A client that goes away gives up its interest in the download: the store stops it (keeping the bytes for
    the next pull) unless another pull or a queued request still waits for the same model.
    """

    def __init__(self, store: ModelStore, air: AIR, *, pin: bool) -> None:
        self._loop = asyncio.get_running_loop()
        # Unbounded: progress comes at most ten times a second, so a slow reader costs little.
        self._queue: asyncio.Queue[DownloadProgress | _Done] = asyncio.Queue()
        self._listening = True
        self._gave_up = threading.Event()
        thread = threading.Thread(target=self._run, args=(store, air, pin), name=f"pull-{air.canonical}", daemon=True)
        thread.start()

    def _run(self, store: ModelStore, air: AIR, pin: bool) -> None:
        try:
            # Leased: neither evicted (by another pull's quota) nor deleted between the download and the pin.
            with store.lease(air):
                record = store.pull(air, progress=self._progress, give_up=self._gave_up)
                # Measure it now (component sizes and fingerprints, what the scheduler budgets and shares
                # with): this reads the weights once more, which a pre-fetch should pay rather than the first
                # Generate that uses the model (about 7 s for a 7 GB checkpoint).
                components_of(record, store.settings.cache_dir)
                if pin:
                    store.pin(air)
                described = store.describe(air)
        except BaseException as exc:
            self._send(_Done(None, exc))
        else:
            self._send(_Done(described, None))

    def _progress(self, progress: DownloadProgress) -> None:
        if self._listening:
            self._send(progress)

    def _send(self, item: DownloadProgress | _Done) -> None:
        # RuntimeError: the loop is closed; the RPC, and whoever would have read this, is long gone.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def events(self) -> AsyncIterator[DownloadProgress | CachedModel]:
        """Progress while the pull runs, then the cached model; raises what the pull raised."""
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Done):
                    if item.error is not None:
                        raise item.error
                    assert item.model is not None
                    yield item.model
                    return
                yield item
        finally:
            self._listening = False
            self._gave_up.set()  # after the end, too: by then the store has nothing left to stop
