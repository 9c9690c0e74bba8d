"""`Client`: Refinery's Generate as a Python iterator of typed events.

    with Client("localhost:50051") as client:
        for event in client.generate("a lighthouse at dusk", steps=20, seed=7, refiner=Refiner()):
            if isinstance(event, Image):
                Path(f"lighthouse-{event.index}.png").write_bytes(event.data)

Every failure is a `RefineryError` (errors.py). Results sent in chunks are reassembled (chunks.py), the
pair-affinity header and the bearer token are sent on every call (metadata.py), and the channel's receive
limit fits any image (channel.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

import grpc

from refinery.client.channel import DEFAULT_MAX_RECEIVE_BYTES, TLS, open_channel
from refinery.client.chunks import ImageAssembler
from refinery.client.errors import from_rpc_error
from refinery.client.events import Event, to_event
from refinery.client.metadata import generate_metadata
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"


class Scheduler(StrEnum):
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    DDIM = "ddim"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    UNIPC = "unipc"


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


_SCHEDULERS = {
    Scheduler.EULER: pb.SCHEDULER_EULER,
    Scheduler.EULER_ANCESTRAL: pb.SCHEDULER_EULER_ANCESTRAL,
    Scheduler.DDIM: pb.SCHEDULER_DDIM,
    Scheduler.DPMPP_2M: pb.SCHEDULER_DPMPP_2M,
    Scheduler.DPMPP_2M_KARRAS: pb.SCHEDULER_DPMPP_2M_KARRAS,
    Scheduler.UNIPC: pb.SCHEDULER_UNIPC,
}
_FORMATS = {
    OutputFormat.PNG: pb.OUTPUT_FORMAT_PNG,
    OutputFormat.JPEG: pb.OUTPUT_FORMAT_JPEG,
    OutputFormat.WEBP: pb.OUTPUT_FORMAT_WEBP,
}


@dataclass(frozen=True)
class Refiner:
    """Hand the last steps to an SDXL refiner. `model` empty: the server's default refiner. Where it takes
    over: `start_step` (it runs start_step..steps), or `start_percentage` of the steps for the base, or 90 %."""

    model: str = ""
    start_step: int | None = None
    start_percentage: int | None = None

    def __post_init__(self) -> None:
        if self.start_step is not None and self.start_percentage is not None:
            raise ValueError("give start_step or start_percentage, not both")

    def to_proto(self) -> pb.Refiner:
        refiner = pb.Refiner(model=self.model)
        if self.start_step is not None:
            refiner.start_step = self.start_step
        if self.start_percentage is not None:
            refiner.start_step_percentage = self.start_percentage
        return refiner


def token_from_env(*, admin: bool = False) -> str | None:
    """The token for generation (REFINERY_TOKEN) or for administration (REFINERY_ADMIN_TOKEN), if set."""
    return os.environ.get("REFINERY_ADMIN_TOKEN" if admin else "REFINERY_TOKEN") or None


class Client:
    """A connection to one Refinery server (or balancer). Thread-safe; close it, or use it as a context manager.

    `token` is sent as `authorization: Bearer <token>` on every call; without `tls` it crosses the network in
    the clear, so use TLS beyond loopback. `max_receive_bytes` bounds every message the server may send; a
    bigger one fails the call with RESOURCE_EXHAUSTED saying so.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TLS | None = None,
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
    ) -> None:
        self._channel = open_channel(target, tls=tls, max_receive_bytes=max_receive_bytes)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated
        self._token = token
        self._max_receive_bytes = max_receive_bytes

    @classmethod
    def from_env(
        cls, target: str | None = None, *, tls: TLS | None = None, max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES
    ) -> Client:
        """The server from `target`, else REFINERY_SERVER, else localhost:50051; the token from REFINERY_TOKEN."""
        target = target or os.environ.get("REFINERY_SERVER") or DEFAULT_TARGET
        return cls(target, token=token_from_env(), tls=tls, max_receive_bytes=max_receive_bytes)

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        model: str = "",
        refiner: Refiner | None = None,
        width: int = 0,
        height: int = 0,
        steps: int = 0,
        cfg_scale: float = 0.0,
        seed: int | None = None,
        scheduler: Scheduler | str | None = None,
        number_results: int = 0,
        output_format: OutputFormat | str | None = None,
        preview_every: int = 0,
        priority: int = 0,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[Event]:
        """Run one request and yield its events as they happen. Zeros and empty strings mean the server's
        defaults, as in GenerateRequest (generation.proto). `request_id` (empty: the server assigns one) is
        echoed on every event and names the request in the server's log. `timeout` is in seconds, for the
        whole call. Stopping the iteration early cancels the request on the server."""
        request = pb.GenerateRequest(
            request_id=request_id,
            model=model,
            positive_prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            cfg_scale=cfg_scale,
            number_results=number_results,
            preview_every=preview_every,
            priority=priority,
        )
        if seed is not None:
            request.seed = seed
        if scheduler is not None:
            request.scheduler = _SCHEDULERS[Scheduler(scheduler)]
        if output_format is not None:
            request.output_format = _FORMATS[OutputFormat(output_format)]
        if refiner is not None:
            request.refiner.CopyFrom(refiner.to_proto())
        return self.stream(request, timeout=timeout)

    def stream(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> Iterator[Event]:
        """`generate` for a GenerateRequest built by hand."""
        call = self._stub.Generate(request, timeout=timeout, metadata=generate_metadata(request, self._token))
        assembler = ImageAssembler()
        request_id = request.request_id
        try:
            for response in call:
                request_id = response.request_id or request_id
                event = to_event(response, assembler.feed(response))
                if event is not None:
                    yield event
            assembler.finish()
        except grpc.RpcError as error:
            raise from_rpc_error(error, receive_limit=self._max_receive_bytes, request_id=request_id) from error
        finally:
            call.cancel()  # nothing once the call has ended; stops the job if the caller stopped listening

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
