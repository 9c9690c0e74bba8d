"""The server process: gRPC (grpc.aio) with health and reflection, the device scheduler, metrics, graceful
shutdown.

    async with RefineryServer(settings) as server:   # port 0 binds a free port: server.port
        await server.wait_ready()                     # default models resident, health SERVING
        ...

`serve(settings)` is what `refinery serve` runs: the same, plus SIGTERM/SIGINT handling.

Health (grpc.health.v1) reports two names, after Triton's live/ready split (shared/research/anchors.md §G):
"" is the process (SERVING while it runs, so a liveness probe does not kill a server that is still loading
its models), and "refinery.v1.GenerationService" turns SERVING once the pinned pairs are resident (the
readiness probe). Both are NOT_SERVING from the moment the server starts draining.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelstore import Loader, ModelStore, load_pipeline
from modelstore.units import format_bytes
from refinery.v1 import generation_pb2_grpc, models_pb2_grpc, status_pb2_grpc
from server.api import generation_service, model_service, server_service
from server.generation import runner
from server.generation.encoding import Encoder
from server.generation.runner import PipelineRunner
from server.metrics import Metrics
from server.scheduling.scheduler import Scheduler
from server.settings import Settings

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    limit = settings.max_message_bytes
    return [
        # Images travel whole, one per message: gRPC's 4 MiB default receive limit is too small for them.
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Long generations are quiet between events and clients keep their connections alive with pings.
        # gRPC's server default (no pings more often than every 5 minutes, GOAWAY "too_many_pings" after 2)
        # drops clients that ping every 10-60 s, so accept pings every 10 s, also with no call running.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Our own pings find clients that vanished without closing (their jobs are then cancelled).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC binds with SO_REUSEPORT by default: a second server on a taken port would silently share it.
        ("grpc.so_reuseport", 0),
    ]


class RefineryServer:
    """One process's server. `start()` binds and serves at once; pinned pairs load in the background."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: ModelStore | None = None,
        loader: Loader = load_pipeline,
        run: PipelineRunner = runner.run,
        encode: Encoder | None = None,
    ) -> None:
        self.settings = settings
        self.store = store if store is not None else ModelStore(settings.store)
        self.metrics = Metrics()
        self.scheduler = Scheduler(settings, self.store, loader=loader, run=run, encode=encode, metrics=self.metrics)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._preloading: asyncio.Task[None] | None = None
        self._draining = False

    async def start(self) -> int:
        """Bind `settings.host:settings.port` (0: a free port), start serving, and begin loading the pinned
        pairs. Returns the bound port."""
        server = grpc.aio.server(options=grpc_options(self.settings))
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]
            generation_service.GenerationService(self.scheduler, self.settings), server
        )
        status_pb2_grpc.add_ServerServiceServicer_to_server(  # type: ignore[no-untyped-call]
            server_service.ServerService(self.scheduler), server
        )
        # The model cache, for operators; a model resident on a device is reported so and cannot be deleted.
        models = model_service.ModelService(self.store, resident_models=self.scheduler.resident_models)
        models_pb2_grpc.add_ModelServiceServicer_to_server(models, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (
            generation_service.SERVICE_NAME,
            server_service.SERVICE_NAME,
            model_service.SERVICE_NAME,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, server)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's way of saying the address is taken or does not resolve
            raise OSError(f"cannot listen on {address}: {exc}") from None
        await self.health.set("", _SERVING)
        await self.health.set(generation_service.SERVICE_NAME, _NOT_SERVING)
        self.scheduler.start()
        await server.start()
        self._server = server
        if self.settings.metrics_port:
            self._metrics_server = self.metrics.serve(self.settings.metrics_port, self.settings.host)
            self.metrics_port = int(self._metrics_server.server_address[1])
            log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        devices = ", ".join(
            f"{w.device.label} (budget {format_bytes(w.residency.budget_bytes)})" for w in self.scheduler.workers
        )
        log.info("listening on %s:%d; devices: %s", self.settings.host, self.port, devices)
        self._preloading = asyncio.create_task(self._preload(), name="refinery-pin")
        return self.port

    async def wait_ready(self) -> None:
        """Wait until the pinned pairs are resident; raises what a failed load raised."""
        if self._preloading is None:
            raise RuntimeError("the server is not started")
        await asyncio.shield(self._preloading)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new RPCs, let running ones finish for `grace_s` (default: the
        settings' grace period), then stop the workers. Calling it again with a shorter grace cuts the drain
        short (gRPC keeps the most restrictive grace)."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        first = not self._draining
        self._draining = True
        if first:
            await self.health.enter_graceful_shutdown()
            log.info("draining: running requests have %.1fs to finish", grace)
        if self._server is not None:
            # Stops accepting at once; RPCs still running after `grace` are cancelled, and their jobs too.
            await self._server.stop(grace)
        if first:
            # Every job's RPC is over by now; close() ends leftovers and joins the threads.
            await asyncio.to_thread(self.scheduler.close, 10.0)
            if self._preloading is not None and not self._preloading.done():
                self._preloading.cancel()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            log.info("stopped")

    async def __aenter__(self) -> RefineryServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _preload(self) -> None:
        if self.settings.pins:
            log.info("pinning %s", ", ".join(str(pin) for pin in self.settings.pins))
            await asyncio.wrap_future(self.scheduler.pin(self.settings.pins))
        await self.health.set(generation_service.SERVICE_NAME, _SERVING)
        log.info("ready")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain within the grace period (a second signal: stop at once)."""
    server = RefineryServer(settings)
    await server.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
    ready = asyncio.create_task(server.wait_ready())
    stopping = asyncio.create_task(stop_requested.wait())
    try:
        await asyncio.wait((ready, stopping), return_when=asyncio.FIRST_COMPLETED)
        failed = ready.exception() if ready.done() else None
        if failed is not None:
            raise failed
        await stopping
        log.info("signal received; shutting down")
        for sig in signals:  # a second signal cuts the grace period short
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop(0)))
        await server.stop()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        ready.cancel()
        stopping.cancel()
        await server.stop(0)
