"""The one exception the client raises, and how a gRPC failure becomes one.

    RefineryError          code, message, field_violations, retry_delay, request_id
      from the server:     its status code and message, with google.rpc.BadRequest / RetryInfo unpacked
      from this client:    RESOURCE_EXHAUSTED when a message exceeded the receive limit this client set,
                           DATA_LOSS when a chunked image broke off or was interleaved (never a partial image)

One type, because a caller's decision depends on the status code (fix the request, retry later, retry
elsewhere), not on where in the stack the failure was noticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# grpc core's own wording when a message exceeds the channel's receive limit ("Received message larger than
# max (5000000 vs. 4194304)"); the server's RESOURCE_EXHAUSTED (overloaded, quota) never reads like this.
_TOO_LARGE = re.compile(r"message larger than max \((\d+) vs\. (\d+)\)", re.IGNORECASE)


@dataclass(frozen=True)
class FieldViolation:
    """A request field the server refused (google.rpc.BadRequest), e.g. `refiner.start_step`."""

    field: str
    description: str


class RefineryError(Exception):
    """A Generate call that did not complete. `code` says what to do: INVALID_ARGUMENT / NOT_FOUND /
    FAILED_PRECONDITION (fix the request; `field_violations` names the fields), RESOURCE_EXHAUSTED (retry after
    `retry_delay` when it is set), UNAVAILABLE (retry, possibly elsewhere), and so on.

    `code` is a `grpc.StatusCode`. grpcio ships no type information, so a type checker sees it as such only with
    grpcio's stubs installed (`pip install 'refinery-client[typing]'`, which adds types-grpcio); without them,
    as `Any`."""

    code: grpc.StatusCode
    message: str
    field_violations: tuple[FieldViolation, ...]
    retry_delay: timedelta | None
    request_id: str

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_delay: timedelta | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations
        self.retry_delay = retry_delay
        # The request's id when known (given by the caller or seen on the stream): the key to the server's log.
        self.request_id = request_id


def from_rpc_error(error: grpc.RpcError, *, receive_limit: int, request_id: str = "") -> RefineryError:
    """Translate a failed call (a `grpc.RpcError` that is also a `grpc.Call`, as every stub raises) made on a
    channel whose receive limit is `receive_limit` bytes."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    too_large = _TOO_LARGE.search(message)
    # The limit in the text tells this client's refusal from a server's (which would quote the server's limit).
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and too_large and int(too_large[2]) == receive_limit:
        size, limit = too_large.groups()
        return RefineryError(
            code,
            f"the server sent a message of {size} bytes, more than this client's receive limit of {limit} bytes "
            "(raise max_receive_bytes, or use a server that sends large images in chunks)",
            request_id=request_id,
        )
    violations: list[FieldViolation] = []
    retry_delay = None
    for detail in _details(error):
        bad_request = error_details_pb2.BadRequest()
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(bad_request):
            violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
        elif detail.Unpack(retry_info):
            retry_delay = retry_info.retry_delay.ToTimedelta()
    return RefineryError(
        code, message, field_violations=tuple(violations), retry_delay=retry_delay, request_id=request_id
    )


def _details(error: grpc.RpcError) -> list[any_pb2.Any]:
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # trailers whose google.rpc.Status contradicts the call's own code or message
        return []
    return list(status.details) if status is not None else []
