"""A scripted GenerationService on loopback: a real gRPC server that replays hand-built responses (and ends
with a chosen status), recording each call's request and metadata. It stands in for a Refinery server in
the client's tests, which need neither torch nor models."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class Call:
    request: pb.GenerateRequest
    metadata: dict[str, str]
    cancelled: threading.Event = field(default_factory=threading.Event)


class ScriptedGeneration(pb_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.script: list[pb.GenerateResponse] = []
        self.failure: status_pb2.Status | None = None
        self.hold = False  # after the script, wait until the client cancels
        self.calls: list[Call] = []

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        call = Call(request, {k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        context.add_callback(call.cancelled.set)
        self.calls.append(call)
        yield from self.script
        if self.hold:
            call.cancelled.wait(60)
        if self.failure is not None:
            context.abort_with_status(rpc_status.to_status(self.failure))


@dataclass
class FakeServer:
    target: str
    service: ScriptedGeneration


def failure(code: grpc.StatusCode, message: str, *details: Any) -> status_pb2.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def serve(credentials: grpc.ServerCredentials | None) -> Iterator[FakeServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service = ScriptedGeneration()
    pb_grpc.add_GenerationServiceServicer_to_server(service, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield FakeServer(f"localhost:{port}" if credentials else f"127.0.0.1:{port}", service)
    finally:
        server.stop(None)
