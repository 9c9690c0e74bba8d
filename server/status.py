"""The one table from exceptions to gRPC statuses, and the rich error details that go with them.

Clients get a status code they can act on, a message that names the problem (never a traceback or a
token), and, where useful, `google.rpc` details: `BadRequest` field violations for INVALID_ARGUMENT (and for
model errors, naming `model` or `refiner.model`), `RetryInfo` for RESOURCE_EXHAUSTED when retrying helps.
tests/test_status.py checks that every error class of both packages has a row here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from modelstore import errors as store_errors
from server import errors

log = logging.getLogger(__name__)

# Most specific classes first is not needed: lookup walks each exception's MRO.
STATUS_TABLE: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.JobCancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OutOfDeviceMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.WorkerFailed: grpc.StatusCode.UNAVAILABLE,
    errors.NotPinned: grpc.StatusCode.NOT_FOUND,
    store_errors.InvalidModelId: grpc.StatusCode.INVALID_ARGUMENT,
    store_errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    store_errors.WrongArchitecture: grpc.StatusCode.FAILED_PRECONDITION,
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
    store_errors.ModelInUse: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.DownloadAbandoned: grpc.StatusCode.CANCELLED,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"


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


def rpc_error_for(exc: BaseException) -> RpcError:
    """Map an exception to the client's status. Unknown exceptions are logged with their traceback."""
    code = status_code_for(exc)
    if code is None:
        log.error("unexpected error", exc_info=exc)
        return RpcError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    details: list[any_pb2.Any] = []
    if isinstance(exc, errors.InvalidRequest):
        details.append(_bad_request([(v.field, v.description, v.reason) for v in exc.violations]))
    elif isinstance(exc, store_errors.ModelStoreError) and exc.field is not None:
        details.append(_bad_request([(exc.field, str(exc), type(exc).__name__)]))
    retry_after = getattr(exc, "retry_after_s", None)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None:
        details.append(_retry_info(float(retry_after)))
    message = str(exc)
    if isinstance(exc, store_errors.ModelStoreError) and exc.field is not None:
        message = f"{exc.field}: {message}"
    return RpcError(code, message, tuple(details))


def _bad_request(violations: list[tuple[str, str, str]]) -> any_pb2.Any:
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d, reason=r) for f, d, r in violations
        ]
    )
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return packed


async def abort(context: grpc.aio.ServicerContext, error: Exception, *, call: str) -> NoReturn:
    """End a unary or server-streaming RPC with the status this table gives `error`, and log one line
    (`call` names the RPC and its target)."""
    failure = rpc_error_for(error)  # unexpected errors: logged with traceback, the client gets INTERNAL
    log.info("%s failed: %s: %s", call, failure.code.name, failure.message)
    await context.abort_with_status(rpc_status.to_status(failure.to_status()))
    raise AssertionError("abort_with_status returned")  # it raises, ending the RPC
