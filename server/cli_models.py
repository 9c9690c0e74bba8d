"""`refinery models`: the model cache from the command line.

    refinery models pull AIR [--pin] [--server ADDR]   download (if needed) and verify; a progress bar meanwhile
    refinery models list [--server ADDR]               a table of the cached models
    refinery models rm AIR [--server ADDR]             delete one (refused while a job uses it)
    refinery models pin|unpin AIR [--server ADDR]      exempt a cached model from the quota's eviction, or not

With `--server` (or REFINERY_SERVER) the commands go to that server's ModelService. Without, they go to a
ModelService started in this process on a free loopback port, over the local cache with the same store
settings `serve` uses (--cache-dir / REFINERY_CACHE_DIR, REFINERY_CACHE_MAX_BYTES, REFINERY_CIVITAI_API,
CIVITAI_TOKEN, HF_ENDPOINT, HF_TOKEN, REFINERY_OFFLINE). So one client path runs either way: the output,
the error lines and the exit codes are the same for a local cache and a remote server, and they are the
statuses a gRPC client of the server would see. That in-process service needs neither torch nor a device,
so `list` answers at once.

A running server holds leases on the models it has loaded and those its requests use. Every process sharing
the cache sees them (a shared file lock per model, `modelstore/leases.py`), so `rm` on the local cache refuses
such a model too; `--server` gives that server's own view (which models are resident).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TextIO

import grpc

from modelstore import ModelStore, StoreSettings
from refinery.v1 import models_pb2 as pb
from refinery.v1 import models_pb2_grpc as pb_grpc
from server.models_service import ModelService

EXIT_FAILED = 1
EXIT_USAGE = 2  # also INVALID_ARGUMENT from the server: the request as given can never work

_ARCHITECTURES = {
    pb.ARCHITECTURE_SDXL_BASE: "SDXL base",
    pb.ARCHITECTURE_SDXL_REFINER: "SDXL refiner",
    pb.ARCHITECTURE_SD1: "SD 1.x",
    pb.ARCHITECTURE_SD2: "SD 2.x",
    pb.ARCHITECTURE_SD3: "SD 3",
    pb.ARCHITECTURE_FLUX: "FLUX",
    pb.ARCHITECTURE_UNKNOWN: "unknown",
}
_BAR_WIDTH = 30


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = commands.add_parser("models", help="pull, list, pin and delete models in the cache")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="{pull,list,rm,pin,unpin}")
    pull = actions.add_parser("pull", help="download a model into the cache (if needed) and verify it")
    pull.add_argument("model", metavar="AIR", help="e.g. civitai:101055@128078")
    pull.add_argument("--pin", action="store_true", help="keep it regardless of the cache quota")
    listing = actions.add_parser("list", help="the cached models")
    rm = actions.add_parser("rm", help="delete a model from the cache")
    rm.add_argument("model", metavar="AIR")
    pin = actions.add_parser("pin", help="keep a cached model regardless of the cache quota")
    pin.add_argument("model", metavar="AIR")
    unpin = actions.add_parser("unpin", help="let the cache quota evict a pinned model again")
    unpin.add_argument("model", metavar="AIR")
    for parser in (pull, listing, rm, pin, unpin):
        parser.add_argument(
            "--server",
            help="HOST:PORT of a running server (default: the local cache, in this process) [REFINERY_SERVER]",
        )
        parser.add_argument("--cache-dir", type=Path, help="model cache without --server [REFINERY_CACHE_DIR]")
        parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
        parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    address = args.server or env.get("REFINERY_SERVER")
    async with contextlib.AsyncExitStack() as stack:
        if not address:
            try:
                settings = StoreSettings.from_env(env, cache_dir=args.cache_dir)
            except ValueError as exc:  # REFINERY_CACHE_MAX_BYTES that is not a number
                print(f"refinery: error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            address = await stack.enter_async_context(_local_service(settings))
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        stub = pb_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            if args.models_command == "pull":
                await _pull(stub, args.model, pin=args.pin)
            elif args.models_command == "list":
                await _list(stub)
            elif args.models_command in ("pin", "unpin"):
                await _pin(stub, args.model, pinned=args.models_command == "pin")
            else:
                await _rm(stub, args.model)
        except grpc.aio.AioRpcError as err:
            print(f"error: {err.code().name}: {err.details() or ''}", file=sys.stderr)
            return EXIT_USAGE if err.code() is grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
    return 0


@contextlib.asynccontextmanager
async def _local_service(settings: StoreSettings) -> AsyncIterator[str]:
    store = ModelStore(settings)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ModelServiceServicer_to_server(ModelService(store), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(1.0)
        store.close()


async def _pull(stub: pb_grpc.ModelServiceStub, model: str, *, pin: bool) -> None:
    view = PullView(model)
    info: pb.ModelInfo | None = None
    try:
        async for response in stub.PullModel(pb.PullModelRequest(model=model, pin=pin)):
            if response.WhichOneof("event") == "progress":
                view.show(response.progress)
            else:
                info = response.model
    finally:
        view.close(completed=info is not None)
    if info is not None:
        pinned = ", pinned" if info.pinned else ""
        print(f"pulled {info.model} ({_architecture(info)}, {human_bytes(info.size_bytes)}{pinned})")


async def _list(stub: pb_grpc.ModelServiceStub) -> None:
    cache: pb.ListModelsResponse = await stub.ListModels(pb.ListModelsRequest())
    rows = [("MODEL", "ARCHITECTURE", "SIZE", "LAST USED (UTC)", "PINNED", "RESIDENT", "IN USE")]
    for m in cache.models:
        last_used = m.last_used.ToDatetime().strftime("%Y-%m-%d %H:%M")
        size = human_bytes(m.size_bytes)
        rows.append((m.model, _architecture(m), size, last_used, _yes(m.pinned), _yes(m.resident), _yes(m.in_use)))
    if cache.models:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    else:
        print("no models in the cache")
    quota = f" of a {human_bytes(cache.quota_bytes)} quota" if cache.quota_bytes else " (no quota)"
    count = f"{len(cache.models)} model{'' if len(cache.models) == 1 else 's'}"
    print(f"{count}, {human_bytes(cache.total_bytes)} on disk{quota}")


async def _pin(stub: pb_grpc.ModelServiceStub, model: str, *, pinned: bool) -> None:
    if pinned:
        info: pb.ModelInfo = (await stub.PinModel(pb.PinModelRequest(model=model))).model
    else:
        info = (await stub.UnpinModel(pb.UnpinModelRequest(model=model))).model
    print(f"{'pinned' if info.pinned else 'unpinned'} {info.model} ({human_bytes(info.size_bytes)})")


async def _rm(stub: pb_grpc.ModelServiceStub, model: str) -> None:
    deleted: pb.DeleteModelResponse = await stub.DeleteModel(pb.DeleteModelRequest(model=model))
    print(f"deleted {model} ({human_bytes(deleted.freed_bytes)} freed)")


class PullView:
    """Download progress of one pull (for a local model: hashing progress) on stderr: a bar redrawn in place
    on a terminal; elsewhere (pipes, CI logs) one line once done, so logs stay short. Nothing when the model
    was already cached."""

    def __init__(self, model: str, stream: TextIO | None = None, *, interactive: bool | None = None) -> None:
        self._model = model
        self._out = stream if stream is not None else sys.stderr
        self._interactive = self._out.isatty() if interactive is None else interactive
        self._last: pb.PullProgress | None = None

    def show(self, progress: pb.PullProgress) -> None:
        self._last = progress
        if not self._interactive:
            return
        done, total = progress.bytes_done, progress.bytes_total
        if total:
            filled = min(_BAR_WIDTH, round(_BAR_WIDTH * done / total))
            bar = f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {human_bytes(done)} / {human_bytes(total)}"
        else:
            bar = human_bytes(done)
        doing = "verifying " if progress.verifying else ""
        rate = human_bytes(int(progress.bytes_per_second))
        self._out.write(f"\r\x1b[2K{doing}{self._model} {bar}  {rate}/s")
        self._out.flush()

    def close(self, *, completed: bool) -> None:
        """End the bar; `completed`: the model is in the cache (else the error line follows)."""
        if self._last is None:
            return
        if self._interactive:
            self._out.write("\n")  # the bar stays, as far as it got
        elif completed:
            rate = human_bytes(int(self._last.bytes_per_second))
            done = "verified" if self._last.verifying else "downloaded"
            self._out.write(f"{self._model}: {human_bytes(self._last.bytes_done)} {done} ({rate}/s)\n")
        self._out.flush()
        self._last = None


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _architecture(info: pb.ModelInfo) -> str:
    return _ARCHITECTURES.get(info.architecture, "unspecified")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
