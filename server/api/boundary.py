"""The one error boundary: every exception an RPC raises becomes a gRPC status through one table.

Servicer methods are straight-line code under the `rpc` decorator; it catches what they raise, maps it here,
logs one line, and ends the call with the status and its `google.rpc` details:

- a message that names the problem (never a traceback or a token);
- `BadRequest` field violations for INVALID_ARGUMENT, and for model-store errors about a model the request
  named (the store's errors carry the AIR; the decorator's `models` says which request field holds which AIR,
  so errors name `model`, `refiner.model` or `refiner_model` as the request spells it), and for image errors
  that name the field their image came from (`image.reference`, `header.size_bytes`), whatever their code;
- `RetryInfo` for RESOURCE_EXHAUSTED when retrying helps.

Anything not in the table is a bug: INTERNAL with a generic message, and the traceback goes to the log.
tests/test_status.py checks that every error class of both packages has a row here.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from modelstore import AIR, Role, parse_stored_air
from modelstore import errors as store_errors
from server.core import errors
from server.core.logs import MAX_LOGGED_CHARS, escaped

log = logging.getLogger(__name__)

# Lookup walks each exception's MRO, so a subclass needs no row of its own.
STATUS_TABLE: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.JobCancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OutOfDeviceMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.WorkerFailed: grpc.StatusCode.UNAVAILABLE,
    errors.DeliveryFailed: grpc.StatusCode.UNAVAILABLE,
    errors.NotPinned: grpc.StatusCode.NOT_FOUND,
    errors.DoesNotFit: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ImageError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.BadImage: grpc.StatusCode.INVALID_ARGUMENT,
    # Never uploaded, or expired: uploading it again helps, retrying does not.
    errors.ImageNotFound: grpc.StatusCode.NOT_FOUND,
    # Over the image store's quota (RetryInfo: until its next image expires) or its byte limit per image.
    errors.ImageStoreFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    store_errors.InvalidModelId: grpc.StatusCode.INVALID_ARGUMENT,
    store_errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    store_errors.WrongArchitecture: grpc.StatusCode.FAILED_PRECONDITION,
    # A checkpoint named where a LoRA is required (a WrongArchitecture; its own row for the table's readers).
    store_errors.NotALora: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.UnsafeCheckpoint: grpc.StatusCode.FAILED_PRECONDITION,
    # The cached files are incomplete or inconsistent; no retry helps until the model is pulled again.
    store_errors.CorruptModel: grpc.StatusCode.FAILED_PRECONDITION,
    # The bytes we got were wrong; the source may serve them right next time.
    store_errors.IntegrityError: grpc.StatusCode.UNAVAILABLE,
    store_errors.SourceUnauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    store_errors.SourcePermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    store_errors.SourceRateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    store_errors.SourceUnavailable: grpc.StatusCode.UNAVAILABLE,
    store_errors.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # The disk under the cache is full now; RetryInfo: the partial download resumes once space returns.
    store_errors.DiskFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # Not cached, and the operator lets no request download it: no retry helps until someone pulls it.
    store_errors.DownloadRefused: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.ModelInUse: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.DownloadAbandoned: grpc.StatusCode.CANCELLED,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"
# A status travels in the call's trailers, which clients cap (gRPC: 16 KiB); error texts may quote what the
# client sent (a 100 KB model name once turned INVALID_ARGUMENT into the client's own RESOURCE_EXHAUSTED).
MAX_MESSAGE_CHARS = 1000
MAX_DESCRIPTION_CHARS = 300


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class ModelField:
    """A request field that names a model: its path as the request spells it, the text it holds (empty: the
    server's default, `default`), and the role the model plays."""

    field: str
    text: str
    role: Role | None = None
    default: AIR | None = None

    def names(self, error: store_errors.ModelStoreError) -> bool:
        if error.air is None:
            return False
        wrong_role = isinstance(error, store_errors.WrongArchitecture) and error.role not in (None, self.role)
        if wrong_role and self.role is not None:
            return False
        if not self.text:
            return self.default is not None and self.default.canonical == error.air
        if error.air == self.text:
            return True
        try:  # the request's own text, as sent: parsed here only to name the field of an error
            return parse_stored_air(self.text).canonical == error.air
        except store_errors.InvalidModelId:
            return False


class Logged(Exception):
    """Carries an error that was already logged where it happened (an admitted request's own log line): the
    boundary maps `cause` to the status and does not log it again."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class RpcError:
    """What the client receives for an exception."""

    code: grpc.StatusCode
    message: str
    details: tuple[any_pb2.Any, ...] = ()

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=list(self.details)
        )


def status_code_for(exc: BaseException) -> grpc.StatusCode | None:
    for cls in type(exc).__mro__:
        code = STATUS_TABLE.get(cls)
        if code is not None:
            return code
    return None


def rpc_error_for(exc: BaseException, models: Sequence[ModelField] = ()) -> RpcError:
    """What the client receives for `exc`: an error the table does not know is INTERNAL with a generic message.
    Logs nothing (`failure_for` does, where an RPC ends)."""
    code = status_code_for(exc)
    if code is None:
        return RpcError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    details: list[any_pb2.Any] = []
    message = str(exc)
    if isinstance(exc, errors.InvalidRequest):
        details.append(_bad_request([(v.field, v.description, v.reason) for v in exc.violations]))
    elif isinstance(exc, errors.DoesNotFit):
        details.append(_bad_request([(exc.field, message, "DOES_NOT_FIT")]))
        message = f"{exc.field}: {message}"
    elif isinstance(exc, errors.ImageError) and exc.field:
        details.append(_bad_request([(exc.field, message, exc.reason)]))
        message = f"{exc.field}: {message}"
    elif isinstance(exc, store_errors.ModelStoreError):
        field = next((m.field for m in models if m.names(exc)), None) or getattr(exc, "field", None)
        if field is not None:
            details.append(_bad_request([(field, message, type(exc).__name__)]))
            message = f"{field}: {message}"
    retry_after = getattr(exc, "retry_after_s", None)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None:
        details.append(_retry_info(float(retry_after)))
    return RpcError(code, _cut(message, MAX_MESSAGE_CHARS), tuple(details))


def _bad_request(violations: list[tuple[str, str, str]]) -> any_pb2.Any:
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=_cut(d, MAX_DESCRIPTION_CHARS), reason=r)
            for f, d, r in violations
        ]
    )
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _retry_info(seconds: float) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo(retry_delay=duration(seconds)))
    return packed


def duration(seconds: float) -> duration_pb2.Duration:
    """Seconds as a protobuf Duration (nanosecond resolution), for the details here and the responses."""
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def failure_for(
    exc: Exception,
    name: str,
    *,
    target: str = "",
    models: Sequence[ModelField] = (),
    request_id: str | None = None,
) -> RpcError:
    """The status RPC `name` ends with for `exc`, and its one log line: "`name` `target` failed: CODE: message",
    and for an error the table does not know (a bug) the traceback, at ERROR. An error already logged where it
    happened (`Logged`) is mapped and not logged again."""
    if isinstance(exc, Logged):
        return rpc_error_for(exc.cause, models)
    failure = rpc_error_for(exc, models)
    extra = {"outcome": failure.code.name.lower()}
    if request_id is not None:  # for JSON logs: the refused request's id, bounded
        extra["request_id"] = request_id[:MAX_LOGGED_CHARS]
    where = f" {target}" if target else ""
    if status_code_for(exc) is None:
        log.error("%s%s failed: %s: unexpected error", name, where, failure.code.name, exc_info=exc, extra=extra)
    else:
        message = escaped(failure.message, MAX_MESSAGE_CHARS)
        log.info("%s%s failed: %s: %s", name, where, failure.code.name, message, extra=extra)
    return failure


# ---- the decorator ----------------------------------------------------------------------------------------

Servicer = Any
Request = Any
Models = Callable[[Servicer, Request], Sequence[ModelField]]
Describe = Callable[[Request], str]
F = TypeVar("F", bound=Callable[..., Any])


def rpc(
    name: str, *, describe: Describe | None = None, models: Models | None = None, request_id: Describe | None = None
) -> Callable[[F], F]:
    """Decorate a servicer method (unary, or server-streaming as an async generator): every exception it
    raises ends the call with the status this module's table gives it, and one log line
    "`name` `describe(request)` failed: CODE: message". `models(servicer, request)` lists the request's model
    fields, so that a model-store error names the field of the model it concerns."""

    def decorate(method: F) -> F:
        async def fail(
            servicer: Servicer, request: Request, context: grpc.aio.ServicerContext, exc: Exception
        ) -> NoReturn:
            if isinstance(exc, grpc.aio.AbortError):
                raise exc  # the call was already ended with a status of its own choosing
            failure = failure_for(
                exc,
                name,
                target=describe(request) if describe is not None else "",
                models=models(servicer, request) if models is not None else (),
                request_id=request_id(request) if request_id is not None else None,
            )
            await context.abort_with_status(rpc_status.to_status(failure.to_status()))
            raise AssertionError("abort_with_status returned")  # it raises, ending the RPC

        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def streaming(
                servicer: Servicer, request: Request, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    async for response in method(servicer, request, context):
                        yield response
                except Exception as exc:  # CancelledError (the client went away) is a BaseException: not caught
                    await fail(servicer, request, context, exc)

            return streaming  # type: ignore[return-value]

        @functools.wraps(method)
        async def unary(servicer: Servicer, request: Request, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await method(servicer, request, context)
            except Exception as exc:
                await fail(servicer, request, context, exc)

        return unary  # type: ignore[return-value]

    return decorate
