"""OpenTelemetry tracing through a real server, exporting over OTLP/gRPC to a real receiver on loopback.

The receiver is a gRPC `TraceService` built from the OTLP protos (`opentelemetry-proto`), as the OpenTelemetry
Collector serves it: what arrives there is what an operator's collector would get. The server is switched on
the way an operator switches it, by the `OTEL_*` environment (`tracing_exporter`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider

from modelstore import ModelStore, StoreSettings
from refinery.client import Client
from refinery.client import Image as ClientImage
from refinery.v1 import generation_pb2 as pb
from server.core.logs import JsonFormatter
from server.core.tracing import tracing_exporter

from .conftest import TIMEOUT_S, ServerThread, collect, make_settings, new_stub

ROOT = Path(__file__).resolve().parents[2]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
STAGES = ("refinery.base", "refinery.refiner", "refinery.decode")
CHILDREN = ("refinery.queue", "refinery.resolve", "refinery.load", "refinery.run", "refinery.encode", "refinery.send")


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on 127.0.0.1:0 that keeps every span it is sent."""

    def __init__(self) -> None:
        self._spans: list[trace_pb2.Span] = []
        self.services: set[str] = set()
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                names = [a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"]
                self.services.update(names)
                for scope in resource_spans.scope_spans:
                    self._spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, found: Callable[[list[trace_pb2.Span]], bool]) -> list[trace_pb2.Span]:
        deadline = time.monotonic() + TIMEOUT_S
        while not found(spans := self.spans()):
            assert time.monotonic() < deadline, f"never arrived; got {[s.name for s in spans]}"
            time.sleep(0.02)
        return spans

    def close(self) -> None:
        self._server.stop(0)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def traced(receiver: Receiver, store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    """A server with tracing on, switched on by an operator's environment: an OTLP endpoint."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms, not the default 5 s
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("OTEL_SERVICE_NAME", raising=False)
        # Static batches: the batch-mates test needs two requests denoised as one batch, start to end.
        settings = make_settings(store_settings, max_batch=4, batching="static", tracing=tracing_exporter(os.environ))
        assert settings.tracing == "otlp"
        thread = ServerThread(settings, store=model_store)
    try:
        thread.wait_ready()
        yield thread
    finally:
        thread.close()


def request(request_id: str, steps: int = 4, seed: int = 1) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id, positive_prompt="a lighthouse", seed=seed, steps=steps, width=64, height=64,
        refiner=pb.Refiner(start_step_percentage=50),
    )  # fmt: skip


def attributes(span: trace_pb2.Span) -> dict[str, object]:
    values: dict[str, object] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        values[a.key] = getattr(a.value, kind) if kind else None
    return values


def request_span(spans: list[trace_pb2.Span], request_id: str) -> trace_pb2.Span | None:
    found = [
        s for s in spans if s.name == "refinery.Generate" and attributes(s).get("refinery.request_id") == request_id
    ]
    return found[0] if found else None


def family(spans: list[trace_pb2.Span], parent: trace_pb2.Span) -> dict[str, trace_pb2.Span]:
    """The request's spans by name: its children, and the run's children."""
    children = {s.name: s for s in spans if s.parent_span_id == parent.span_id}
    run = children.get("refinery.run")
    if run is not None:
        children |= {s.name: s for s in spans if s.parent_span_id == run.span_id}
    return children


def test_a_callers_trace_goes_on_through_every_stage_of_its_request(
    traced: ServerThread, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.scheduling.ticket")
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    with grpc.insecure_channel(traced.address) as channel:
        stub = new_stub(channel)
        responses = list(stub.Generate(request("traced-1"), timeout=TIMEOUT_S, metadata=[("traceparent", traceparent)]))
    assert [r for r in responses if r.WhichOneof("event") == "image"], "no image"

    spans = receiver.wait_for(lambda s: request_span(s, "traced-1") is not None)
    root = request_span(spans, "traced-1")
    assert root is not None
    assert root.trace_id.hex() == CALLER_TRACE and root.parent_span_id.hex() == CALLER_SPAN
    assert root.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert receiver.services == {"refinery"}  # no OTEL_SERVICE_NAME: the server names itself
    attrs = attributes(root)
    assert attrs["refinery.outcome"] == "ok" and attrs["rpc.method"] == "Generate"
    assert (attrs["refinery.steps"], attrs["refinery.base_steps"], attrs["refinery.refiner_steps"]) == (4, 2, 2)
    assert attrs["refinery.model"] == "builtin:tiny-sdxl-base@1" and attrs["refinery.width"] == 64

    spans = receiver.wait_for(lambda s: set(CHILDREN + STAGES) <= set(family(s, root)))
    children = family(spans, root)
    assert {s.trace_id.hex() for s in children.values()} == {CALLER_TRACE}
    run = children["refinery.run"]
    for name in STAGES:
        assert children[name].parent_span_id == run.span_id, f"{name} is not a child of the run"
    for span in children.values():  # every part within the request, none ending before it starts
        assert root.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= root.end_time_unix_nano, span.name
    order = ["refinery.queue", "refinery.load", "refinery.base", "refinery.refiner", "refinery.decode"]
    order += ["refinery.encode", "refinery.send"]
    for earlier, later in itertools.pairwise(order):
        assert children[earlier].end_time_unix_nano <= children[later].start_time_unix_nano, (earlier, later)
    assert run.start_time_unix_nano <= children["refinery.base"].start_time_unix_nano
    assert children["refinery.decode"].end_time_unix_nano <= run.end_time_unix_nano

    # The request's one log line names the trace and the request span: a log search finds the trace.
    (line,) = [r for r in caplog.records if getattr(r, "request_id", None) == "traced-1"]
    logged = json.loads(JsonFormatter().format(line))
    assert (logged["trace_id"], logged["span_id"]) == (CALLER_TRACE, root.span_id.hex())


def test_the_python_client_sends_its_callers_active_span(traced: ServerThread, receiver: Receiver) -> None:
    caller = TracerProvider().get_tracer("a caller")  # the caller's own SDK; not the process-global one
    with caller.start_as_current_span("caller's work") as span, Client(traced.address) as client:
        events = list(client.generate("a fox", steps=2, width=64, height=64, request_id="traced-2", timeout=TIMEOUT_S))
    assert [e for e in events if isinstance(e, ClientImage)]
    context = span.get_span_context()
    spans = receiver.wait_for(lambda s: request_span(s, "traced-2") is not None)
    root = request_span(spans, "traced-2")
    assert root is not None
    assert (root.trace_id.hex(), root.parent_span_id.hex()) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")


def test_without_a_caller_context_a_request_starts_its_own_trace(traced: ServerThread, receiver: Receiver) -> None:
    with grpc.insecure_channel(traced.address) as channel:
        collect(new_stub(channel), request("traced-3"))
    root = request_span(receiver.wait_for(lambda s: request_span(s, "traced-3") is not None), "traced-3")
    assert root is not None and root.parent_span_id == b"" and len(root.trace_id) == 16


def test_a_refused_request_is_a_span_of_its_own_with_its_outcome(traced: ServerThread, receiver: Receiver) -> None:
    bad = request("refused-1", steps=100_000)
    with grpc.insecure_channel(traced.address) as channel, pytest.raises(grpc.RpcError) as refused:
        collect(new_stub(channel), bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    root = request_span(receiver.wait_for(lambda s: request_span(s, "refused-1") is not None), "refused-1")
    assert root is not None and attributes(root)["refinery.outcome"] == "invalid"
    assert root.status.code == trace_pb2.Status.STATUS_CODE_UNSET  # the caller's mistake, not the server's
    assert family(receiver.spans(), root) == {}  # it never queued


def test_batch_mates_link_to_each_other(traced: ServerThread, receiver: Receiver) -> None:
    with grpc.insecure_channel(traced.address) as channel, futures.ThreadPoolExecutor(3) as pool:
        stub = new_stub(channel)
        # A long request occupies the device so the two queue up together and run as one batch.
        blocker = pool.submit(collect, stub, request("blocker", steps=60))
        time.sleep(0.3)
        mates = [pool.submit(collect, stub, request(f"mate-{i}", seed=i)) for i in range(2)]
        for call in [blocker, *mates]:
            call.result(TIMEOUT_S)
    spans = receiver.wait_for(lambda s: all(request_span(s, f"mate-{i}") for i in range(2)))
    roots = [request_span(spans, f"mate-{i}") for i in range(2)]
    assert roots[0] is not None and roots[1] is not None
    assert [attributes(r)["refinery.batch.size"] for r in roots] == [2, 2], "not batched together"
    spans = receiver.wait_for(lambda s: all("refinery.run" in family(s, r) for r in roots if r is not None))
    for me, mate in (roots, roots[::-1]):
        run = family(spans, me)["refinery.run"]
        assert [(link.trace_id, link.span_id) for link in run.links] == [(mate.trace_id, mate.span_id)]


# Off: a server from the same code, with OTLP settings present but `OTEL_TRACES_EXPORTER=none`.
_OFF = """
import asyncio, logging, os, sys
from pathlib import Path
import grpc
from modelstore import StoreSettings
from refinery.v1 import generation_pb2 as pb, generation_pb2_grpc as pb_grpc
from server.app import RefineryServer
from server.core.logs import configure_logging
from server.core.settings import Settings
from server.core.tracing import tracing_exporter

async def main():
    configure_logging(logging.INFO, json_format=True)
    store = StoreSettings(cache_dir=Path(__CACHE__), offline=True)
    settings = Settings(
        store=store, host="127.0.0.1", port=0, devices=("cpu",), drain_delay_s=0.0, grace_period_s=5.0,
        tracing=tracing_exporter(os.environ),
    )
    async with RefineryServer(settings) as server:
        await server.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = pb.GenerateRequest(request_id="untraced", positive_prompt="a fox", steps=2, width=64, height=64)
            metadata = [("traceparent", "00-__TRACE__-__SPAN__-01")]
            async for _ in pb_grpc.GenerationServiceStub(channel).Generate(request, metadata=metadata):
                pass
        print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"), flush=True)

asyncio.run(main())
"""


def test_off_nothing_is_exported_and_opentelemetry_is_never_imported(
    receiver: Receiver, store_settings: StoreSettings, model_store: ModelStore
) -> None:
    script = _OFF.replace("__CACHE__", repr(str(store_settings.cache_dir)))
    script = script.replace("__TRACE__", CALLER_TRACE).replace("__SPAN__", CALLER_SPAN)
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.port}"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (logged,) = [line for line in lines if line.get("request_id") == "untraced"]
    # The caller's trace id still joins the log line to the caller's trace; Refinery made no span of its own.
    assert logged["trace_id"] == CALLER_TRACE and "span_id" not in logged
    # Never imported, so nothing can have been exported; and indeed no span of this request arrived (the count
    # of spans is no measure: the module's traced server may still be exporting an earlier test's).
    time.sleep(0.2)
    assert request_span(receiver.spans(), "untraced") is None, "a server with tracing off exported spans"


@pytest.mark.parametrize(
    ("env", "exporter"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
    ],
)
def test_the_switch_is_the_standard_environment(env: dict[str, str], exporter: str | None) -> None:
    assert tracing_exporter(env) == exporter


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
    ],
)
def test_an_exporter_it_cannot_serve_is_refused_at_start(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="OTEL_"):
        tracing_exporter(env)
