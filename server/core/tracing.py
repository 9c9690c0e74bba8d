"""OpenTelemetry tracing: off by default and free when off; on with the standard `OTEL_*` environment.

The switch (`tracing_exporter`, read by the CLI into `Settings.tracing`): on when `OTEL_TRACES_EXPORTER` names
an exporter (`otlp` or `console`; `none` is off), or when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`
or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) without an exporter named; `OTEL_SDK_DISABLED=true` turns it off
whatever else is set, as it does for every OpenTelemetry SDK. Everything else is the SDK's to read, as it reads
it for any other service: the endpoint, headers, TLS and timeout of the OTLP/gRPC exporter
(`OTEL_EXPORTER_OTLP_*`), the resource (`OTEL_SERVICE_NAME`, default "refinery", `OTEL_RESOURCE_ATTRIBUTES`),
the sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`) and the batch processor (`OTEL_BSP_*`).

Off, nothing here imports OpenTelemetry: the server pays one `None` check per request. The caller's W3C trace
context (`traceparent`) is still read then, by `parse_traceparent` (a few string operations), so that the
request's log line carries the caller's trace id: a log line can be joined to the caller's trace even where
Refinery itself exports nothing.

The tracer keeps its own provider (never the process-global one): two servers in one process (tests, the CLI's
in-process server) each flush and shut down their own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link, Span

EXPORTERS = ("otlp", "console")
DEFAULT_SERVICE_NAME = "refinery"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# W3C Trace Context, version 00 (https://www.w3.org/TR/trace-context/#traceparent-header); later versions may
# append fields, which a version-00 reader ignores.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def tracing_exporter(env: Mapping[str, str]) -> str | None:
    """The exporter `env` asks for ("otlp", "console"), or None: tracing off. Raises ValueError for an exporter
    or an OTLP protocol this server does not ship."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not named:
        named = ["otlp"] if endpoint else []
    named = [e for e in named if e != "none"]
    if not named:
        return None
    if len(named) > 1 or named[0] not in EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER: one of {', '.join(EXPORTERS)} or none, not {','.join(named)!r}")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if named[0] == "otlp" and protocol != "grpc":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: this server exports OTLP over grpc only, not {protocol!r}")
    return named[0]


@dataclass(frozen=True)
class TraceParent:
    """A caller's W3C trace context as it came: ids in lower-case hex."""

    trace_id: str
    span_id: str
    sampled: bool


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The caller's context from a `traceparent` value, or None when absent or invalid (all-zero ids, version
    ff, a malformed value: the spec says to ignore it and start a new trace)."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(span_id) == {"0"}:
        return None
    return TraceParent(trace_id, span_id, sampled=bool(int(flags, 16) & 1))


def epoch_ns(perf_s: float, *, now_ns: int, now_perf_s: float) -> int:
    """A `time.perf_counter()` reading as nanoseconds since the epoch, from one pair of readings of both clocks
    taken together (`now_ns`, `now_perf_s`): spans are recorded from the perf_counter timestamps the scheduler
    already takes."""
    return now_ns - round((now_perf_s - perf_s) * 1e9)


class Tracer:
    """The server's tracer: an SDK provider with a batch processor and the configured exporter. Build it once
    at start-up (`Tracer.from_environment`), `shutdown()` at the end (flushes what is left)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("refinery")
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_environment(cls, exporter: str) -> Tracer:
        """`exporter` as `tracing_exporter` named it; the SDK reads the rest of the `OTEL_*` environment."""
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        resource = Resource.create({})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):  # the SDK's fallback
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        span_exporter: SpanExporter
        if exporter == "console":
            span_exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(span_exporter))  # exports on its own thread
        return cls(provider)

    def start_server_span(self, name: str, metadata: Mapping[str, str], attributes: Mapping[str, Any]) -> Span:
        """The span of one call, a child of the caller's span when its metadata carries a valid traceparent."""
        from opentelemetry.trace import SpanKind

        carrier = {key: metadata[key] for key in (TRACEPARENT, TRACESTATE) if key in metadata}
        parent = self._propagator.extract(carrier) if carrier else None
        return self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    def record(
        self,
        name: str,
        parent: Span,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] = (),
    ) -> Span:
        """A finished child span of `parent`, from measured times: nothing is timed by the tracer itself."""
        from opentelemetry.trace import set_span_in_context

        context: Context = set_span_in_context(parent)
        span = self._tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes, links=links)
        span.end(end_time=max(start_ns, end_ns))
        return span

    @staticmethod
    def link(span: Span, attributes: Mapping[str, Any] | None = None) -> Link:
        from opentelemetry.trace import Link

        return Link(span.get_span_context(), attributes=attributes)

    @staticmethod
    def fail(span: Span, description: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, description))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is buffered (up to `timeout_s`), then stop the exporter."""
        self._provider.force_flush(int(timeout_s * 1000))
        self._provider.shutdown()


def span_ids(span: Span) -> tuple[str, str]:
    """A span's trace and span ids in hex, as the log line and the W3C header write them."""
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def clock_pair() -> tuple[int, float]:
    """Both clocks read together, for `epoch_ns`."""
    return time.time_ns(), time.perf_counter()
