"""The caller's OpenTelemetry trace context, sent with each Generate call so that the server's spans join the
caller's trace (W3C `traceparent` / `tracestate` metadata, as the server reads them: README "Tracing").

Optional: without the `opentelemetry-api` package, or without an active span, nothing is sent and nothing is
imported beyond one failed import (remembered). With it, the caller's configured propagator writes the context
(`opentelemetry.propagate.inject`: W3C trace context by default, whatever `OTEL_PROPAGATORS` names otherwise).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping


@functools.cache
def _injector() -> Callable[[MutableMapping[str, str]], None] | None:
    try:
        from opentelemetry import propagate
    except ImportError:
        return None
    return propagate.inject


def trace_metadata() -> list[tuple[str, str]]:
    """Metadata entries carrying the caller's current trace context; none without an active span."""
    inject = _injector()
    if inject is None:
        return []
    carrier: dict[str, str] = {}
    inject(carrier)
    # gRPC metadata keys are lower-case ASCII; a propagator's own keys already are (traceparent, baggage, ...).
    return [(key.lower(), value) for key, value in carrier.items()]
