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

A pinned pair that cannot be loaded (a damaged or missing model, say) does not stop the server: it is logged
and reported in GetStatus, and the other pairs are served (`server/core/pins.py` says what readiness does then).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from server.api import generation_service, model_service, server_service, transport
from server.api.access import AccessInterceptor, check_served, is_loopback_host
from server.api.boundary import status_code_for
from server.core.domain import PairKey
from server.core.metrics import DownloadCounter, Metrics
from server.core.pins import PinFailures
from server.core.settings import Settings
from server.core.tracing import Tracer
from server.generation import Encoder, PipelineRunner, run_pair
from server.images import ImageStore
from server.scheduling import Scheduler

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How often expired images are looked for while no upload or kept result comes to sweep them.
IMAGE_SWEEP_EVERY_S = 60.0


class RefineryServer:
    """One process's server. `start()` binds and serves at once; pinned pairs load in the background."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: ModelStore | None = None,
        loader: Loader = load_pipeline,
        run: PipelineRunner = run_pair,
        encode: Encoder | None = None,
        images: ImageStore | None = None,
    ) -> None:
        self.settings = settings
        # With the store's own loader each cached model's weight files are read once at start: their check is
        # made on the bytes `load_pipeline` reads (issue 19). Another loader gets them checked before, as ever.
        one_read = loader is load_pipeline
        self.store = store if store is not None else ModelStore(settings.store, check_weights_when_loaded=one_read)
        # Input images and kept results, on the cache volume; what a previous run stored and has not expired
        # is found again.
        self.images = images if images is not None else ImageStore.from_settings(settings)
        self.store.confine_local(settings.security.local_model_roots)  # request-named models stay inside
        self.metrics = Metrics()
        # Built here, not at import: off (the default), OpenTelemetry is never imported.
        self.tracer = Tracer.from_environment(settings.tracing) if settings.tracing else None
        self.metrics.watch(DownloadCounter(self.store))  # who made this server download what
        self.scheduler = Scheduler(settings, self.store, loader=loader, run=run, encode=encode, metrics=self.metrics)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._preloading: asyncio.Task[None] | None = None
        self._sweeping: asyncio.Task[None] | None = None
        self.pin_failures = PinFailures()
        self._draining = False
        self._stop_now = asyncio.Event()
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0

    async def start(self) -> int:
        """Bind `settings.host:settings.port` (0: a free port), start serving, and begin loading the pinned
        pairs. Returns the bound port."""
        settings = self.settings
        creds = transport.credentials(settings.security)  # first: a bad certificate stops the start at once
        server = self._grpc_server()
        self.port = transport.bind(server, f"{settings.host}:{settings.port}", creds)
        if settings.health_port:
            self._health_server, self.health_port = transport.health_only_server(
                self.health, f"{settings.host}:{settings.health_port}"
            )
            await self._health_server.start()
        await self.health.set("", _SERVING)
        await self.health.set(generation_service.SERVICE_NAME, _NOT_SERVING)
        self.scheduler.start()
        await server.start()
        self._server = server
        if self.settings.metrics_port:
            try:
                self._metrics_server = self.metrics.serve(self.settings.metrics_port, self.settings.host)
            except OSError as exc:  # taken: stop what started, and say so in one line
                await self.stop(0)
                address = f"{self.settings.host}:{self.settings.metrics_port}"
                raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
            self.metrics_port = self._metrics_server.port
            log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        devices = ", ".join(
            f"{w.device.label} (budget {format_bytes(w.residency.budget_bytes)})" for w in self.scheduler.workers
        )
        tls = "TLS" + (" with client certificates" if settings.security.tls_client_ca else "") if creds else "plaintext"
        log.info("listening on %s:%d (%s); devices: %s", settings.host, self.port, tls, devices)
        _announce_access(settings, self.port)
        if settings.tracing:
            log.info(
                "tracing: exporting spans (%s; OTEL_* settings as the OpenTelemetry SDK reads them)", settings.tracing
            )
        self._preloading = asyncio.create_task(self._preload(), name="refinery-pin")
        self._sweeping = asyncio.create_task(self._sweep_images(), name="refinery-image-sweep")
        return self.port

    async def _sweep_images(self) -> None:
        while True:
            await asyncio.sleep(IMAGE_SWEEP_EVERY_S)
            try:
                await asyncio.to_thread(self.images.sweep_if_due)
            except OSError as exc:  # the volume went read-only or away: say so, and try again later
                log.error("image store: cannot delete expired images: %s", exc)

    def _grpc_server(self) -> grpc.aio.Server:
        settings = self.settings
        # A method the access check cannot guard stops the start (health and reflection are open).
        check_served((generation_service.SERVICE, server_service.SERVICE, model_service.SERVICE))
        server = grpc.aio.server(
            options=transport.grpc_options(settings),
            interceptors=[AccessInterceptor(settings.security, self.metrics.calls)],
        )
        roots = settings.security.local_model_roots
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]
            generation_service.GenerationService(self.scheduler, settings, self.images, tracer=self.tracer), server
        )
        status = server_service.ServerService(
            self.scheduler, local_roots=roots, pin_failures=self.pin_failures, on_pinned=self._pinned
        )
        status_pb2_grpc.add_ServerServiceServicer_to_server(status, server)  # type: ignore[no-untyped-call]
        # The model cache, for operators; a model resident on a device is reported so and cannot be deleted.
        models = model_service.ModelService(
            self.store, resident_models=self.scheduler.resident_models, local_roots=roots
        )
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
        return server

    async def wait_ready(self) -> None:
        """Wait until the pinned pairs are loaded, or failed to (`pin_failures`)."""
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
        if grace_s == 0:
            self._stop_now.set()
        if first:
            await self.health.enter_graceful_shutdown()
            await self._announce_drain(grace_s is None)
            log.info("draining: running requests have %.1fs to finish", grace)
        if self._server is not None:
            # Stops accepting at once; RPCs still running after `grace` are cancelled, and their jobs too.
            await self._server.stop(grace)
        if first:
            # Every job's RPC is over by now; close() ends leftovers and joins the threads.
            await asyncio.to_thread(self.scheduler.close, 10.0)
            if self._preloading is not None and not self._preloading.done():
                self._preloading.cancel()
            if self._sweeping is not None:
                self._sweeping.cancel()
            if self._metrics_server is not None:
                self._metrics_server.close()
            if self._health_server is not None:
                await self._health_server.stop(0)
            if self.tracer is not None:  # every request has ended: export their spans before the process goes
                await asyncio.to_thread(self.tracer.shutdown)
            log.info("stopped")

    async def _announce_drain(self, graceful: bool) -> None:
        """Keep accepting calls for the drain delay while health says NOT_SERVING, so a balancer that polls
        health moves traffic away before the port closes (a second signal ends the wait)."""
        delay = self.settings.drain_delay_s if graceful else 0.0
        if delay > 0:
            log.info("draining: NOT_SERVING; still accepting calls for %.1fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_now.wait(), delay)

    async def __aenter__(self) -> RefineryServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _preload(self) -> None:
        pins = self.settings.pins
        if pins:
            log.info("pinning %s", ", ".join(str(pin) for pin in pins))
        for pair in pins:  # one at a time: a pair that fails leaves the others pinned
            try:
                await asyncio.wrap_future(self.scheduler.pin([pair]))
            except Exception as exc:
                self.pin_failures.record(pair, exc)
                unexpected = status_code_for(exc) is None  # a bug: its traceback, once
                log.error(
                    "could not pin %s: %s; serving the other pairs", pair, exc, exc_info=exc if unexpected else None
                )
        if pins and len(self.pin_failures) == len(pins):
            log.error("no pinned pair could be loaded: not ready (NOT_SERVING) until PinPair loads one")
            return
        await self.health.set(generation_service.SERVICE_NAME, _SERVING)
        log.info("ready")

    async def _pinned(self, pair: PairKey) -> None:
        """PinPair loaded `pair`: it is no longer a failed pin, and the server is ready (if it was not)."""
        self.pin_failures.clear(pair)
        if not self._draining and self._preloading is not None and self._preloading.done():
            await self.health.set(generation_service.SERVICE_NAME, _SERVING)


def _announce_access(settings: Settings, port: int) -> None:
    security = settings.security
    # Open access is a warning on a port other machines can reach; on loopback (the CLI's own in-process
    # server, a sidecar) only this machine can call, so it is worth a line but not a warning.
    level = logging.INFO if is_loopback_host(settings.host) else logging.WARNING
    if security.admin_token is None and security.trust_loopback_admin:
        log.log(
            level,
            "no admin token (REFINERY_ADMIN_TOKEN): pull, verify, pin, unpin, delete, PinPair and UnpinPair are "
            "allowed only from this machine (loopback), to any caller there (--trust-loopback-admin)",
        )
    elif security.admin_token is None:
        log.info("no admin token (REFINERY_ADMIN_TOKEN): administration (pull, pin, delete, ...) is off")
    if security.token is None and security.admin_token is None:
        log.log(level, "no tokens: anyone who can reach %s:%d may generate", settings.host, port)
    roots = ", ".join(str(r) for r in security.local_model_roots)
    log.info("local models from requests: %s", f"under {roots}" if roots else "none")


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
