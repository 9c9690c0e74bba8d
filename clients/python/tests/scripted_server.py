"""A scripted Refinery server on loopback: a real gRPC server whose GenerationService, ModelService and
ServerService replay hand-built responses (and end with a chosen status), recording each call's request and
metadata. It stands in for a Refinery server in the client's tests, which need neither torch nor models."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status

from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from refinery.v1 import models_pb2_grpc, status_pb2_grpc


@dataclass
class Call:
    request: pb.GenerateRequest
    metadata: dict[str, str]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Upload:
    """One UploadImage stream as the server received it: its header, the size of each data message, the bytes."""

    header: pb.UploadHeader
    pieces: list[int]
    data: bytes
    metadata: dict[str, str]


class ScriptedGeneration(pb_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.script: list[pb.GenerateResponse] = []
        self.failure: status_pb2.Status | None = None
        self.hold = False  # after the script, wait until the client cancels
        self.calls: list[Call] = []
        self.uploads: list[Upload] = []
        self.upload_failures: list[status_pb2.Status] = []  # the next uploads fail with these, in order

    def UploadImage(
        self, requests: Iterator[pb.UploadImageRequest], context: grpc.ServicerContext
    ) -> pb.UploadImageResponse:
        """Records the stream and answers as a store would: the reference is the bytes' sha256."""
        header, pieces = pb.UploadHeader(), []
        for message in requests:
            if message.HasField("header"):
                header = message.header
            else:
                pieces.append(message.data)
        data = b"".join(pieces)
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.uploads.append(Upload(header, [len(piece) for piece in pieces], data, metadata))
        if self.upload_failures:
            context.abort_with_status(rpc_status.to_status(self.upload_failures.pop(0)))
        answer = pb.UploadImageResponse(
            reference=f"sha256:{hashlib.sha256(data).hexdigest()}", mime_type="image/png", size_bytes=len(data)
        )
        answer.expires.FromSeconds(1_900_000_000)
        return answer

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
class AdminCall:
    method: str  # "PullModel"
    request: Message
    metadata: dict[str, str]
    cancelled: threading.Event = field(default_factory=threading.Event)


class ScriptedAdmin:
    """The model and server services: `answers[method]` is what a call of `method` gets (one message for a
    unary call, every message of a stream), then `failure` if set; `hold` keeps a stream open until the client
    cancels."""

    def __init__(self) -> None:
        self.answers: dict[str, list[Message]] = {}
        self.failure: status_pb2.Status | None = None
        self.hold = False
        self.calls: list[AdminCall] = []

    def unary(self, method: str, request: Message, context: grpc.ServicerContext) -> Message:
        self._record(method, request, context)
        if self.failure is not None:
            context.abort_with_status(rpc_status.to_status(self.failure))
        (answer,) = self.answers[method]
        return answer

    def stream(self, method: str, request: Message, context: grpc.ServicerContext) -> Iterator[Message]:
        call = self._record(method, request, context)
        yield from self.answers.get(method, [])
        if self.hold:
            call.cancelled.wait(60)
        if self.failure is not None:
            context.abort_with_status(rpc_status.to_status(self.failure))

    def _record(self, method: str, request: Message, context: grpc.ServicerContext) -> AdminCall:
        call = AdminCall(method, request, {k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        context.add_callback(call.cancelled.set)
        self.calls.append(call)
        return call


class _Models(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, admin: ScriptedAdmin) -> None:
        self.admin = admin

    def PullModel(self, request: Any, context: grpc.ServicerContext) -> Iterator[Message]:
        return self.admin.stream("PullModel", request, context)

    def VerifyModel(self, request: Any, context: grpc.ServicerContext) -> Iterator[Message]:
        return self.admin.stream("VerifyModel", request, context)

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self.admin.unary("ListModels", request, context)

    def PinModel(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self.admin.unary("PinModel", request, context)

    def UnpinModel(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self.admin.unary("UnpinModel", request, context)

    def DeleteModel(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self.admin.unary("DeleteModel", request, context)


class _Server(status_pb2_grpc.ServerServiceServicer):
    def __init__(self, admin: ScriptedAdmin) -> None:
        self.admin = admin

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self.admin.unary("GetStatus", request, context)

    def PinPair(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self.admin.unary("PinPair", request, context)

    def UnpinPair(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self.admin.unary("UnpinPair", request, context)


@dataclass
class FakeServer:
    target: str
    service: ScriptedGeneration
    admin: ScriptedAdmin


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
    admin = ScriptedAdmin()
    pb_grpc.add_GenerationServiceServicer_to_server(service, server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(_Models(admin), server)
    status_pb2_grpc.add_ServerServiceServicer_to_server(_Server(admin), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield FakeServer(f"localhost:{port}" if credentials else f"127.0.0.1:{port}", service, admin)
    finally:
        server.stop(None)
