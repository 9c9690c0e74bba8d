"""`Client`: Refinery's Generate as a Python iterator of typed events (`AsyncClient` in aio.py is the same for
asyncio).

    with Client("localhost:50051") as client:
        for event in client.generate("a lighthouse at dusk", steps=20, seed=7, refiner=Refiner()):
            if isinstance(event, Image):
                Path(f"lighthouse-{event.index}.png").write_bytes(event.data)

An image to start from (`image=`, `mask=`) is bytes, a path or a reference; `generate` uploads one too large to
go inline (`upload_image`, images.py) and names it by reference.

The same client administers a server: the model service (`pull_model`, `list_models`, `pin_model`,
`unpin_model`, `verify_model`, `delete_model`; values in models.py) and the server service (`status`,
`pin_pair`, `unpin_pair`; values in status.py), each call described once in _calls.py.

Every failure is a `RefineryError` (errors.py). Results sent in chunks are reassembled (chunks.py), the
pair-affinity header and the bearer token are sent on every call (metadata.py), and the channel's receive
limit fits any image (channel.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from datetime import timedelta
from types import TracebackType
from typing import TypeVar, Unpack

import grpc

from refinery.client import _calls
from refinery.client.channel import DEFAULT_MAX_RECEIVE_BYTES, TLS, open_channel
from refinery.client.chunks import ImageAssembler
from refinery.client.errors import from_rpc_error
from refinery.client.events import Event, to_event
from refinery.client.images import ImageSource, UploadedImage, upload_header, upload_requests, uploaded
from refinery.client.metadata import bearer, generate_metadata, pair_metadata
from refinery.client.models import ModelInfo, ModelList, PullEvent, VerifyEvent
from refinery.client.request import GenerateOptions, generate_request, pair_of, to_upload, with_references
from refinery.client.resend import Attempts, OnResend, Resend, identified
from refinery.client.status import DeviceStatus, ServerStatus
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc

R = TypeVar("R")

DEFAULT_TARGET = "localhost:50051"


def token_from_env(*, admin: bool = False) -> str | None:
    """The token for generation (REFINERY_TOKEN) or for administration (REFINERY_ADMIN_TOKEN), or read from the
    file that REFINERY_TOKEN_FILE / REFINERY_ADMIN_TOKEN_FILE names (a mounted Kubernetes secret), which wins
    when both are set, as on the server (`refinery serve`). Surrounding whitespace is dropped; None when neither
    is set (or the variable is empty). ValueError, naming the variable and never the token, when the file cannot
    be read or holds no token, or the token is not one gRPC can send (visible ASCII only)."""
    var = "REFINERY_ADMIN_TOKEN" if admin else "REFINERY_TOKEN"
    path = os.environ.get(f"{var}_FILE")
    if path:
        source = f"{var}_FILE {path}"
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                token = file.read().strip()
        except OSError as exc:
            raise ValueError(f"{source}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"{source}: the file holds no token")
    else:
        source, token = var, os.environ.get(var, "").strip()
        if not token:
            return None
    if not all(0x21 <= ord(char) <= 0x7E for char in token):
        raise ValueError(f"{source}: a token may hold only visible ASCII characters (no spaces or line breaks)")
    return token


def target_from_env(target: str | None = None) -> str:
    """`target`, else REFINERY_SERVER, else localhost:50051."""
    return target or os.environ.get("REFINERY_SERVER") or DEFAULT_TARGET


class Client:
    """A connection to one Refinery server (or balancer). Thread-safe; close it, or use it as a context manager.

    `token` is sent as `authorization: Bearer <token>` on generation and status calls, `admin_token` on
    administration (pulling, verifying, pinning and deleting models, pinning pairs); each stands in for the
    other when only one is given. Without `tls` a token crosses the network in the clear, so use TLS beyond
    loopback. `max_receive_bytes` bounds every message the server may send; a bigger one fails the call with
    RESOURCE_EXHAUSTED saying so.

    `resend`: a `Generate` that failed before any response with a status a resend can fix (a replica lost or
    stopping) is sent again, with the same request id, within the policy's attempts and budget (resend.py;
    None: never). `on_resend` is told of each resend.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        admin_token: str | None = None,
        tls: TLS | None = None,
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
        resend: Resend | None = Resend(),  # noqa: B008  # frozen: one shared value is safe
        on_resend: OnResend | None = None,
    ) -> None:
        self._channel = open_channel(target, tls=tls, max_receive_bytes=max_receive_bytes)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated
        self._token = token
        self._admin_token = admin_token
        self._max_receive_bytes = max_receive_bytes
        self._resend = resend
        self._on_resend = on_resend
        self._closed = False

    @classmethod
    def from_env(
        cls, target: str | None = None, *, tls: TLS | None = None, max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES
    ) -> Client:
        """The server from `target`, else REFINERY_SERVER, else localhost:50051; the tokens from REFINERY_TOKEN
        and REFINERY_ADMIN_TOKEN."""
        token, admin_token = token_from_env(), token_from_env(admin=True)
        return cls(
            target_from_env(target), token=token, admin_token=admin_token, tls=tls, max_receive_bytes=max_receive_bytes
        )

    def generate(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Generator[Event, None, None]:
        """Run one request and yield its events as they happen; the options are GenerateRequest's fields
        (request.py). An `image` or `mask` over 96 KiB is uploaded first (`prepare`). `timeout` is in seconds,
        for each call. Stopping the iteration early (a `break`) cancels the request on the server."""
        yield from self.stream(self.prepare(prompt, timeout=timeout, **options), timeout=timeout)

    def prepare(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> pb.GenerateRequest:
        """The request `generate` sends: an `image` or `mask` too large to go inline is uploaded (kept for the
        server's default time, sent with the request's pair-affinity header) and named by its reference."""
        model, refiner_model = pair_of(options)
        references = {
            field: self.upload_image(source, model=model, refiner_model=refiner_model, timeout=timeout).reference
            for field, source in to_upload(options).items()
        }
        return generate_request(prompt, **with_references(options, references))

    def upload_image(
        self,
        source: ImageSource,
        keep_for: timedelta | float | None = None,
        *,
        model: str = "",
        refiner_model: str = "",
        timeout: float | None = None,
    ) -> UploadedImage:
        """Store an image on the server (UploadImage) for requests to name by its reference: `source` is the
        bytes of a PNG, JPEG or WebP, or a path to one, streamed in 64 KiB pieces after a header with its size
        and sha256. `keep_for` (a timedelta or seconds; None: the server's default) is how long the server keeps
        it, at most its limit; the same bytes uploaded again are kept longer. `model` / `refiner_model`: the pair
        of the requests that will use it, for a balancer that routes by pair. Resent like `Generate` when a lost
        replica refused it (the server keeps nothing of a broken upload)."""
        header = upload_header(source, keep_for)
        metadata = pair_metadata(model, refiner_model, bearer(self._token, self._admin_token, admin=False))
        attempts = Attempts(self._resend, timeout, f"upload sha256:{header.sha256}", self._on_resend)
        while True:
            try:
                response = self._stub.UploadImage(
                    upload_requests(header, source), timeout=attempts.timeout(), metadata=metadata + attempts.metadata()
                )
                return uploaded(response)
            except grpc.RpcError as error:
                delay = attempts.after(error, answered=False, closed=self._closed)
                if delay is None:
                    raise attempts.note(from_rpc_error(error, receive_limit=self._max_receive_bytes)) from error
            time.sleep(delay)

    def stream(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> Generator[Event, None, None]:
        """`generate` for a GenerateRequest built by hand."""
        request = identified(request, self._resend)
        token = bearer(self._token, self._admin_token, admin=False)
        attempts = Attempts(self._resend, timeout, request.request_id, self._on_resend)
        while True:
            metadata = generate_metadata(request, token)
            call = self._stub.Generate(request, timeout=attempts.timeout(), metadata=metadata + attempts.metadata())
            assembler = ImageAssembler()
            request_id = request.request_id
            answered = False
            try:
                for response in call:
                    answered = True
                    request_id = response.request_id or request_id
                    event = to_event(response, assembler.feed(response))
                    if event is not None:
                        yield event
                assembler.finish()
                return
            except grpc.RpcError as error:
                delay = attempts.after(error, answered=answered, closed=self._closed)
                if delay is None:
                    failure = from_rpc_error(error, receive_limit=self._max_receive_bytes, request_id=request_id)
                    raise attempts.note(failure) from error
            finally:
                call.cancel()  # nothing once the call has ended; stops the job if the caller stopped listening
            time.sleep(delay)

    # ---- the model service: the server's model cache --------------------------------------------------------

    def pull_model(
        self, model: str, *, pin: bool = False, timeout: float | None = None
    ) -> Generator[PullEvent, None, None]:
        """Download `model` (an AIR) into the server's cache if it is not there, and check its files; yields
        `PullProgress` meanwhile, then the `ModelInfo` pulled. `pin`: exempt it from the cache quota's eviction.
        Stopping the iteration early cancels the pull (the bytes received are kept for the next one)."""
        return self._stream(_calls.pull_model(model, pin), timeout)

    def list_models(self, *, timeout: float | None = None) -> ModelList:
        return self._unary(_calls.list_models(), timeout)

    def pin_model(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        """Exempt a cached model from the quota's eviction (never downloads: NOT_FOUND when not cached)."""
        return self._unary(_calls.pin_model(model), timeout)

    def unpin_model(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        return self._unary(_calls.unpin_model(model), timeout)

    def delete_model(self, model: str, *, timeout: float | None = None) -> int:
        """Delete a cached model; the bytes freed. FAILED_PRECONDITION while it is in use."""
        return self._unary(_calls.delete_model(model), timeout)

    def verify_model(self, model: str = "", *, timeout: float | None = None) -> Generator[VerifyEvent, None, None]:
        """Read `model` (empty: every cached model) in full and check each file's SHA256; yields `PullProgress`
        while it reads, and one `VerifyResult` per model. A damaged file is set aside and fetched again."""
        return self._stream(_calls.verify_model(model), timeout)

    # ---- the server service: devices, queue, pinned pairs -----------------------------------------------------

    def status(self, *, timeout: float | None = None) -> ServerStatus:
        return self._unary(_calls.get_status(), timeout)

    def pin_pair(
        self, model: str, refiner_model: str = "", *, timeout: float | None = None
    ) -> tuple[DeviceStatus, ...]:
        """Load a base (and refiner) on every device and keep them there; answers once they are resident
        (RESOURCE_EXHAUSTED, nothing pinned, when the pair cannot fit beside those already pinned)."""
        return self._unary(_calls.pin_pair(model, refiner_model, pin=True), timeout)

    def unpin_pair(
        self, model: str, refiner_model: str = "", *, timeout: float | None = None
    ) -> tuple[DeviceStatus, ...]:
        """Let a pinned pair be evicted again, least recently used first."""
        return self._unary(_calls.pin_pair(model, refiner_model, pin=False), timeout)

    def _unary(self, call: _calls.Unary[R], timeout: float | None) -> R:
        invoke = self._channel.unary_unary(
            call.method, request_serializer=_calls.serialize, response_deserializer=call.response.FromString
        )
        try:
            response = invoke(
                call.request, timeout=timeout, metadata=_calls.metadata(call, self._token, self._admin_token)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, receive_limit=self._max_receive_bytes) from error
        return call.convert(response)

    def _stream(self, call: _calls.Streaming[R], timeout: float | None) -> Generator[R, None, None]:
        invoke = self._channel.unary_stream(
            call.method, request_serializer=_calls.serialize, response_deserializer=call.response.FromString
        )
        responses = invoke(
            call.request, timeout=timeout, metadata=_calls.metadata(call, self._token, self._admin_token)
        )
        try:
            for response in responses:
                event = call.convert(response)
                if event is not None:
                    yield event
        except grpc.RpcError as error:
            raise from_rpc_error(error, receive_limit=self._max_receive_bytes) from error
        finally:
            responses.cancel()  # nothing once the call has ended; stops the pull if the caller stopped listening

    def close(self) -> None:
        self._closed = True  # a call the closing channel cancels is not resent
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
