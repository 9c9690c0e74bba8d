"""Prometheus metrics for operators (deploy/grafana has a dashboard of them).

- Calls: `refinery_requests_total{method, code}` for every RPC by its gRPC status, refused ones included
  (counted where calls enter, `server/api/access.py`).
- Generate requests: outcomes (`refinery_jobs_total{outcome}`: ok, cancelled, deadline_exceeded, rejected,
  failed, where a request whose images its client did not take is failed), end-to-end latency
  (`refinery_request_seconds`), time to the first denoising step (`refinery_first_step_seconds`), time queued,
  step time, images delivered, batch sizes, and what requests started from and which stages ran
  (`refinery_job_modes_total{mode, stages}`: text / img2img / inpaint; base / base+refiner / refiner).
- Devices: model loads and evictions (how often pairs move: the "is the fleet thrashing?" signal), budgets;
  GPU utilisation and memory where there is a GPU (`server/scheduling/gpu_gauges.py`).
- State read at scrape time from the scheduler's snapshot (`watch`; the collector is
  `server/scheduling/gauges.py`), so it never drifts: queue depth per priority, resident bytes and running
  requests per device; every one of these has a series even at zero.
- Every series a dashboard or alert reads exists from start-up, at zero, for every label value known then
  (outcomes, stages, devices): tests/integration/test_metrics_truth.py reads the queries from deploy/ and checks.
  A request whose images all reached its client is `ok` and its call `OK`, however the client closes afterwards.
- The process: bytes received from model sources, `refinery_build_info{version}`; downloads begun by the
  model store per cause (`refinery_downloads_total{cause}`: request, pull, pin), read from the store at scrape
  time (`watch(DownloadCounter(store))`).

Each server owns its registry (several servers can live in one test process); `serve` exposes it on
`--metrics-port` at /metrics, and answers 404 on any other path (a health check must not mistake it for one).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from modelstore import Cause, ModelStore, downloaded_bytes
from server.core.domain import ImageMode, Stage
from server.core.http_endpoint import HttpEndpoint

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2)
_REQUEST_SECONDS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "refinery_requests",
            "Calls by method and gRPC status code, refused ones included",
            ["method", "code"],
            registry=r,
        )
        self.jobs = Counter(
            "refinery_jobs",
            "Generate requests by outcome (ok, cancelled, deadline_exceeded, rejected, failed)",
            ["outcome"],
            registry=r,
        )
        self.modes = _modes_counter(r)
        self.request_time = Histogram(
            "refinery_request_seconds",
            "Generate requests from admission to their end, by outcome",
            ["outcome"],
            buckets=_REQUEST_SECONDS,
            registry=r,
        )
        self.first_step = Histogram(
            "refinery_first_step_seconds",
            "From admission to a request's first denoising step (queue, downloads, loading included)",
            buckets=_SECONDS,
            registry=r,
        )
        self.images = Counter("refinery_images", "Images delivered to clients", registry=r)
        self.queue_wait = Histogram(
            "refinery_queue_wait_seconds", "Time from admission to a device", buckets=_SECONDS, registry=r
        )
        self.step_time = Histogram(
            "refinery_step_seconds", "Wall time of one denoising step", ["stage"], buckets=_STEP_SECONDS, registry=r
        )
        self.batch_images = Histogram(
            "refinery_batch_images", "Images denoised together", buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r
        )
        self.loads = Histogram(
            "refinery_model_load_seconds",
            "Loading a model pair onto a device",
            ["device"],
            buckets=_SECONDS,
            registry=r,
        )
        self.evictions = Histogram(
            "refinery_eviction_seconds", "Evicting idle pairs to make room", ["device"], buckets=_SECONDS, registry=r
        )
        self.budget_bytes = Gauge(
            "refinery_budget_bytes", "Memory budget for model weights on a device", ["device"], registry=r
        )
        build = Gauge("refinery_build_info", "The running build (always 1)", ["version"], registry=r)
        build.labels(_version()).set(1)
        r.register(_DownloadCollector())
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Series at zero from the start for every label known now (devices get theirs in `add_device`), so that
        rates, alerts and dashboards see the first event too rather than an absent series."""
        for outcome in ("ok", "cancelled", "deadline_exceeded", "rejected", "failed"):
            self.jobs.labels(outcome)
            self.request_time.labels(outcome)
        for stage in Stage:
            self.step_time.labels(stage.value)
        for mode in ImageMode:
            for stages in ("base", "base+refiner", "refiner"):
                self.modes.labels(mode.value, stages)
        self.calls.labels("Generate", "OK")

    def add_device(self, name: str, budget_bytes: int) -> None:
        """A device's series: its budget, and its load and eviction times at zero until its first load or
        eviction (a replica started with `--pin none` loads nothing before its first request)."""
        self.budget_bytes.labels(name).set(budget_bytes)
        self.loads.labels(name)
        self.evictions.labels(name)

    def watch(self, collector: Collector) -> None:
        """Read gauges of live state from `collector` at every scrape (the room that owns the state makes it:
        `server.scheduling.gauges` for the scheduler's snapshot)."""
        self.registry.register(collector)

    def serve(self, port: int, host: str = "0.0.0.0") -> HttpEndpoint:
        """Serve /metrics over HTTP (404 elsewhere) from a thread of its own, with a bounded cost however many
        connections are open (`http_endpoint.py`); `.port` is the bound port, `.close()` stops it. OSError when
        the port is taken."""
        registry = self.registry
        return HttpEndpoint(host, port, "/metrics", lambda: (generate_latest(registry), CONTENT_TYPE_LATEST))


def _modes_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "refinery_job_modes",
        "Finished Generate requests by what they started from (text, img2img, inpaint) and the stages that ran "
        "(base, base+refiner, refiner: refine-only)",
        ["mode", "stages"],
        registry=registry,
    )


def _version() -> str:
    try:
        return importlib.metadata.version("refinery")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class DownloadCounter(Collector):
    """`refinery_downloads_total{cause}` from the store's own count: who made the server download (a request,
    an operator's pull, a pin), with a series for each cause from the start."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "refinery_downloads", "Model downloads begun, by who caused them (request, pull, pin)", labels=["cause"]
        )
        counts = self._store.download_counts()
        for cause in Cause:
            family.add_metric([cause.value], counts.get(cause, 0))
        yield family


class _DownloadCollector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "refinery_download_bytes", "Bytes received from model sources by this process", value=downloaded_bytes()
        )
