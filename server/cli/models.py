"""`refinery models`: the model cache from the command line.

    refinery models pull AIR [--pin] [--server ADDR]   download (if needed) and verify; a progress bar meanwhile
    refinery models list [--server ADDR]               a table of the cached models (checkpoints and LoRAs)
    refinery models rm AIR [--server ADDR]             delete one (refused while a job uses it)
    refinery models pin|unpin AIR [--server ADDR]      exempt a cached model from the quota's eviction, or not
    refinery models verify [AIR] [--server ADDR]       check every file's SHA256 (all cached models by default);
                                                       a damaged one is set aside and fetched again; exit 1 if
                                                       any stays damaged

With `--server` (or REFINERY_SERVER) the commands go to that server's ModelService. Without, they go to a
ModelService started in this process on a free loopback port, over the local cache with the same store
settings `serve` uses (--cache-dir / REFINERY_CACHE_DIR, REFINERY_CACHE_MAX_BYTES, REFINERY_CIVITAI_API,
CIVITAI_TOKEN, HF_ENDPOINT, HF_TOKEN, REFINERY_OFFLINE). So one client path runs either way: the output,
the error lines and the exit codes are the same for a local cache and a remote server, and they are the
statuses a gRPC client of the server would see. That in-process service needs no device and loads no
pipeline, so `list` answers at once. It answers only this command's own client (a secret drawn per run): other
users of the machine can reach its port, but not the caller's cache or files through it.

A running server holds leases on the models it has loaded and those its requests use. Every process sharing
the cache sees them (a shared file lock per model, `modelstore/leases.py`), so `rm` on the local cache refuses
such a model too; `--server` gives that server's own view (which models are resident).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc

from modelstore import ModelStore, StoreSettings
from modelstore.units import format_bytes
from refinery.client import Architecture, AsyncClient, ModelInfo, ModelKind, RefineryError
from refinery.v1 import models_pb2_grpc as pb_grpc
from server.api.access import AccessInterceptor
from server.cli import connect, serve
from server.cli.terminal import PullView, print_table, report_failure
from server.cli.verify import verify_models
from server.core.metrics import Metrics
from server.core.settings import Security

_ARCHITECTURES = {
    Architecture.SDXL_BASE: "SDXL base",
    Architecture.SDXL_REFINER: "SDXL refiner",
    Architecture.SDXL_INPAINT: "SDXL inpainting",
    Architecture.SD1: "SD 1.x",
    Architecture.SD2: "SD 2.x",
    Architecture.SD3: "SD 3",
    Architecture.FLUX: "FLUX",
    Architecture.UNKNOWN: "unknown",
}
_KINDS = {ModelKind.CHECKPOINT: "checkpoint", ModelKind.LORA: "LoRA"}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], env: Mapping[str, str]) -> None:
    models = commands.add_parser("models", help="pull, list, pin and delete models in the cache")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="{pull,list,rm,pin,unpin,verify}")
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
    verify = actions.add_parser(
        "verify", help="read cached models in full and check their SHA256; fetch again what fails"
    )
    verify.add_argument("model", metavar="AIR", nargs="?", default="", help="one model (default: every one)")
    for parser in (pull, listing, rm, pin, unpin, verify):
        connect.add_flags(parser, env, what="default: the local cache, in this process")
        serve.add_store_flags(parser)
        serve.add_log_flags(parser, env)


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    address = args.server
    async with contextlib.AsyncExitStack() as stack:
        if address:
            # The client sends the admin token for pull, pin, unpin, rm and verify, the generation token for list.
            client = await stack.enter_async_context(connect.client(address, args, env))
        else:
            roots = serve.local_roots_of_the_caller([getattr(args, "model", None)])
            local = _local_service(serve.store_settings(args, env), roots)
            address, run_token = await stack.enter_async_context(local)
            client = await stack.enter_async_context(AsyncClient(address, token=run_token, admin_token=run_token))
        try:
            if args.models_command == "pull":
                await _pull(client, args.model, pin=args.pin)
            elif args.models_command == "list":
                await _list(client)
            elif args.models_command in ("pin", "unpin"):
                await _pin(client, args.model, pinned=args.models_command == "pin")
            elif args.models_command == "verify":
                return await verify_models(client, args.model)
            else:
                await _rm(client, args.model)
        except RefineryError as err:
            return report_failure(err)
    return 0


@contextlib.asynccontextmanager
async def _local_service(settings: StoreSettings, local_roots: Sequence[Path]) -> AsyncIterator[tuple[str, str]]:
    """The ModelService in this process, on loopback: the caller's own cache and files; and the secret its every
    call needs. Any user of the machine can reach a loopback port, so the service answers only this command's
    own client (`serve.only_this_process`, as `refinery generate`'s in-process server)."""
    security = serve.only_this_process(Security())
    run_token = security.token
    assert run_token is not None
    # Here, not at the top: the servicer's conversions load torch, which `refinery --version` must not wait for.
    from server.api.model_service import ModelService

    store = ModelStore(settings)
    gate = AccessInterceptor(security, Metrics().calls)
    server = grpc.aio.server(interceptors=[gate], options=[("grpc.so_reuseport", 0)])
    service = ModelService(store, local_roots=local_roots)
    pb_grpc.add_ModelServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", run_token
    finally:
        await server.stop(1.0)
        store.close()


async def _pull(client: AsyncClient, model: str, *, pin: bool) -> None:
    view = PullView(model)
    info: ModelInfo | None = None
    try:
        async for event in client.pull_model(model, pin=pin):
            if isinstance(event, ModelInfo):
                info = event
            else:
                view.show(event)
    finally:
        view.close(completed=info is not None)
    if info is not None:
        pinned = ", pinned" if info.pinned else ""
        words = f"; trigger words: {_words(info)}" if info.trigger_words else ""
        what = f"LoRA for {_architecture(info)}" if info.kind is ModelKind.LORA else _architecture(info)
        print(f"pulled {info.model} ({what}, {format_bytes(info.size_bytes)}{pinned}{words})")


async def _list(client: AsyncClient) -> None:
    cache = await client.list_models()
    rows = [("MODEL", "KIND", "ARCHITECTURE", "SIZE", "LAST USED (UTC)", "PINNED", "RESIDENT", "IN USE")]
    for m in cache.models:
        last_used = m.last_used.strftime("%Y-%m-%d %H:%M")
        size, flags = format_bytes(m.size_bytes), (_yes(m.pinned), _yes(m.resident), _yes(m.in_use))
        rows.append((m.model, _KINDS.get(m.kind, "unspecified"), _architecture(m), size, last_used, *flags))
    if cache.models:
        print_table(rows)
        # Below the table rather than in it: a LoRA's words can be many and long.
        for m in cache.models:
            if m.trigger_words:
                print(f"trigger words of {m.model}: {_words(m)}")
    else:
        print("no models in the cache")
    quota = f" of a {format_bytes(cache.quota_bytes)} quota" if cache.quota_bytes else " (no quota)"
    count = f"{len(cache.models)} model{'' if len(cache.models) == 1 else 's'}"
    print(f"{count}, {format_bytes(cache.total_bytes)} on disk{quota}")


async def _pin(client: AsyncClient, model: str, *, pinned: bool) -> None:
    info = await (client.pin_model(model) if pinned else client.unpin_model(model))
    print(f"{'pinned' if info.pinned else 'unpinned'} {info.model} ({format_bytes(info.size_bytes)})")


async def _rm(client: AsyncClient, model: str) -> None:
    freed = await client.delete_model(model)
    print(f"deleted {model} ({format_bytes(freed)} freed)")


def _architecture(info: ModelInfo) -> str:
    return _ARCHITECTURES.get(info.architecture, "unspecified")


def _words(info: ModelInfo) -> str:
    return ", ".join(info.trigger_words)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
