"""A request's trace: one server span per Generate call, and its children recorded from the ticket's measured
timestamps when the request ends, so no tracing call sits on a device's or an encoder's path.

    refinery.Generate          the call (SERVER), a child of the caller's span when it sent a traceparent
    ├── refinery.queue         admitted until a device took it
    ├── refinery.resolve       its models leased, resolved (downloaded if need be) and measured; during the queue
    ├── refinery.load          the pair made resident on the device (0 s when it already was)
    ├── refinery.run           the batch's denoising run, linked to its batch mates' request spans
    │   ├── refinery.base      the base's steps (its prompts encoded first)
    │   ├── refinery.refiner   the refiner's steps
    │   └── refinery.decode    the VAE decode of the batch's images
    ├── refinery.encode        its images encoded (PNG/JPEG/WebP) on the encoder threads
    └── refinery.send          until the client took the last message

A batch's run is shared by its members: each member's trace gets its own `refinery.run` and stage spans (so a
caller sees every second of its own request in its own trace), with `refinery.batch.size` and a link to each
batch mate's request span. There is no span of the batch alone: it would be a trace of its own that no caller
sees, and it would be made on the worker's thread.

The stages are laid out from the runner's measured durations (`StageTimings`, on CUDA timed on the device's own
timeline): the base from the run's start, the decode ending at the run's end, the refiner just before the decode.
A request that ended mid-run gets the steps it saw, one stage after the other, and no decode.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.core.errors import InvalidRequest
from server.core.tracing import TRACEPARENT, TraceParent, Tracer, clock_pair, epoch_ns, parse_traceparent, span_ids
from server.scheduling.ticket import Ticket, Timings, outcome_of

if TYPE_CHECKING:
    from opentelemetry.trace import Span

REQUEST_SPAN = "refinery.Generate"
_RPC = {"rpc.system": "grpc", "rpc.service": "refinery.v1.GenerationService", "rpc.method": "Generate"}
_MAX_ATTRIBUTE_CHARS = 200  # a request id refused as too long still names the span, cut
# Outcomes that are the server's failure (OpenTelemetry's gRPC conventions: a deadline is a server error too);
# a cancelled or refused request is not.
_ERRORS = ("failed", "deadline_exceeded")


@dataclass(frozen=True)
class Window:
    """One child span to record: perf_counter seconds; `parent` names another window, None the request span."""

    name: str
    start: float
    end: float
    parent: str | None = None


def windows(t: Timings, end: float) -> list[Window]:
    """The children of a request that ended at `end`, from its timings: only the parts it reached."""
    started = t.started or end
    found = [Window("refinery.queue", t.submitted, started)]
    if t.resolving:
        found.append(Window("refinery.resolve", t.resolving, t.resolved or end))
    if t.started:
        found.append(Window("refinery.load", t.started, t.started + t.loading_s))
    if t.run_started:
        run_end = t.run_ended or end
        found.append(Window("refinery.run", t.run_started, run_end))
        found += _stages(t, run_end)
    if t.delivering:
        encoded = t.delivering + t.encode_s if t.encode_s else end  # no encode_s: it failed while encoding
        found.append(Window("refinery.encode", t.delivering, encoded))
        if encoded < end:
            found.append(Window("refinery.send", encoded, end))
    return found


def _stages(t: Timings, run_end: float) -> list[Window]:
    run = "refinery.run"
    if t.run is None:  # ended mid-run: the steps it saw, in order
        base = t.run_started + t.stepped.get("base", 0.0)
        stages = [Window("refinery.base", t.run_started, base, run)]
        if "refiner" in t.stepped:
            stages.append(Window("refinery.refiner", base, base + t.stepped["refiner"], run))
        return stages
    decode_start = run_end - t.run.decode_s
    stages = [Window("refinery.base", t.run_started, min(t.run_started + t.run.base_s, decode_start), run)]
    if t.run.refiner_s:
        stages.append(Window("refinery.refiner", max(t.run_started, decode_start - t.run.refiner_s), decode_start, run))
    stages.append(Window("refinery.decode", decode_start, run_end, run))
    return stages


class Trace:
    """A request's `RequestTrace`: its server span when tracing is on, else the caller's context alone (for the
    log line)."""

    def __init__(self, tracer: Tracer | None, span: Span | None, caller: TraceParent | None = None) -> None:
        self._tracer = tracer
        self.span = span
        self._caller = caller

    def log_fields(self) -> dict[str, str]:
        if self.span is not None:
            trace_id, span_id = span_ids(self.span)
            return {"trace_id": trace_id, "span_id": span_id}
        return {"trace_id": self._caller.trace_id} if self._caller is not None else {}

    def end(self, ticket: Ticket, outcome: str, error: BaseException | None) -> None:
        """Record the children from the ticket's timings, then end the request span (now)."""
        tracer, span = self._tracer, self.span
        if tracer is None or span is None:
            return
        if span.is_recording():  # not sampled: nothing would be exported
            now_ns, now_perf = clock_pair()
            at = functools.partial(epoch_ns, now_ns=now_ns, now_perf_s=now_perf)
            span.set_attributes(_request_attributes(ticket, outcome))
            self._outcome(outcome, error)
            recorded: dict[str | None, Span] = {None: span}
            for window in windows(ticket.timings, now_perf):
                links = self._batch_links(ticket) if window.name == "refinery.run" else []
                attributes = {"refinery.batch.size": len(ticket.batch)} if window.name == "refinery.run" else None
                parent = recorded[window.parent]
                recorded[window.name] = tracer.record(
                    window.name, parent, at(window.start), at(window.end), attributes, links
                )
            span.end(end_time=now_ns)
        else:
            span.end()

    def abandon(self, error: BaseException, request_id: str) -> None:
        """End the span of a call refused before it was admitted (invalid, the queue full, draining)."""
        if self._tracer is None or self.span is None:
            return
        if isinstance(error, InvalidRequest):
            outcome = "invalid"
        else:  # the call itself cancelled (asyncio.CancelledError) is the client's doing, never a failure
            outcome = outcome_of(error) if isinstance(error, Exception) else "cancelled"
        self.span.set_attributes(
            {"refinery.request_id": request_id[:_MAX_ATTRIBUTE_CHARS], "refinery.outcome": outcome}
        )
        self._outcome(outcome, error)
        self.span.end()

    def _outcome(self, outcome: str, error: BaseException | None) -> None:
        assert self._tracer is not None and self.span is not None
        if outcome in _ERRORS:
            self._tracer.fail(self.span, outcome if error is None else f"{outcome}: {type(error).__name__}")

    def _batch_links(self, ticket: Ticket) -> list[Any]:
        assert self._tracer is not None
        mates = [m.trace.span for m in ticket.batch if m is not ticket and isinstance(m.trace, Trace)]
        return [self._tracer.link(span, {"refinery.link": "batch_mate"}) for span in mates if span is not None]


def start_trace(tracer: Tracer | None, metadata: Mapping[str, str]) -> Trace | None:
    """A Generate call's trace, begun as the call arrives: its span (a child of the caller's, when `metadata`
    carries a traceparent) when tracing is on; off, the caller's trace context alone, or None without one."""
    if tracer is None:
        caller = parse_traceparent(metadata.get(TRACEPARENT))
        return None if caller is None else Trace(None, None, caller)
    return Trace(tracer, tracer.start_server_span(REQUEST_SPAN, metadata, _RPC))


def _request_attributes(ticket: Ticket, outcome: str) -> dict[str, Any]:
    job = ticket.job
    return {
        "refinery.request_id": job.request_id,
        "refinery.outcome": outcome,
        "refinery.model": job.model.canonical,
        "refinery.refiner": job.refiner.model.canonical if job.refiner is not None else "",
        "refinery.steps": job.total_steps,
        "refinery.base_steps": job.base_steps_run,
        "refinery.refiner_steps": job.refiner_steps,
        "refinery.mode": job.mode.value,
        "refinery.first_step": job.start_index + 1,
        "refinery.steps_done": ticket.steps_done,
        "refinery.width": job.width,  # 0: the model's native size
        "refinery.height": job.height,
        "refinery.results": job.number_results,
        "refinery.compare": job.compare,
        "refinery.batch.size": len(ticket.batch),
    }
