"""Sending a `Generate` again when it failed before it answered: which failures, how often, for how long.

A replica that goes away fails the calls it holds. Behind a balancer (nginx, Envoy) a call that reached a
replica in the instant it began to stop, or that the balancer had written to a replica that then died, ends
before any response with a status that says nothing ran to completion; sent again, it lands on a live replica.
`Client` and `AsyncClient` do that for `Generate` under a `Resend` policy (on by default):

- **resent**, when no response message has arrived on the stream:
  - `UNAVAILABLE`: the replica or the balancer could not take the call (connection refused or reset, a
    balancer's 502/503, a server that is draining);
  - `CANCELLED` that this client did not cause: a stopping server cancels calls it had received but not
    started (a call this client cancels, or one on a client being closed, is never resent);
  - `INTERNAL` from a reset HTTP/2 stream ("RST_STREAM"): what nginx sends when the replica's connection broke
    (a server's own INTERNAL, a bug, would fail again and is not resent);
- **never resent once a response has arrived**: a stream that produced events (queued, progress, an image
  chunk) has shown its progress to the caller, and a resend would start the request again from nothing
  (its queue place, its steps) under the same id. The failure is raised; the caller may send it again
  knowingly. A `kill -9` of a replica in the middle of a call ends that way;
- **never resent for other codes**: `INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION`,
  `PERMISSION_DENIED`, `UNAUTHENTICATED` (the same request fails the same way), `RESOURCE_EXHAUSTED` (a full
  queue or device: resending at once adds to the overload; `RefineryError.retry_delay` says when to try),
  `DEADLINE_EXCEEDED` (the caller's time is spent), `UNKNOWN`, `DATA_LOSS`, a server's own `INTERNAL`.

Bounds: at most `attempts` sends in all (the first included, as gRPC's `maxAttempts`), no resend starting more
than `budget_s` after the call began, and never past the call's `timeout` (one deadline for all attempts).
Between attempts the client waits a random time between 0 and `initial_backoff_s * multiplier ** (n - 1)`
(capped at `max_backoff_s`) before attempt n + 1: gRPC's own backoff with full jitter, so that the callers of
one lost replica do not all come back at once.

Every attempt sends the same request with the same `request_id` (drawn by the client when the caller left it
empty), so the server's log shows one id for all of them, and a `refinery-attempt: N` header on the resends
(N = 2, 3, ...) that the nginx access log records. `on_resend` is told of each resend (`Resent`): the count
a caller, a test or a benchmark reads.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from refinery.v1 import generation_pb2 as pb

ATTEMPT_HEADER = "refinery-attempt"

# grpc's own wording for a call this process cancelled or whose channel it closed.
_LOCAL_CANCEL = ("Locally cancelled", "Channel closed")


@dataclass(frozen=True)
class Resend:
    """How a client resends a `Generate` that failed before any response (see the module docstring).
    `Resend(attempts=1)` (or `resend=None` on the client) turns resending off."""

    attempts: int = 5  # sends in all, the first one included
    budget_s: float = 30.0  # no resend starts later than this after the call began
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts counts the first send too: at least 1")
        if min(self.budget_s, self.initial_backoff_s, self.max_backoff_s) < 0 or self.multiplier < 1:
            raise ValueError("budget and backoffs must not be negative, the multiplier at least 1")

    def backoff_s(self, resend: int) -> float:
        """The longest wait before resend number `resend` (1 for the first)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (resend - 1))


NO_RESEND = Resend(attempts=1)


@dataclass(frozen=True)
class Resent:
    """One resend, as `on_resend` is told of it before the client waits `delay_s` and sends again."""

    request_id: str
    attempt: int  # the attempt about to be sent: 2 for the first resend
    code: grpc.StatusCode  # what the previous attempt failed with
    details: str
    delay_s: float


OnResend = Callable[[Resent], None]


def resendable(code: grpc.StatusCode, details: str) -> bool:
    """Whether a `Generate` that failed with `code` before any response is worth sending again."""
    if code is grpc.StatusCode.UNAVAILABLE:
        return True
    if code is grpc.StatusCode.CANCELLED:
        return not any(marker in details for marker in _LOCAL_CANCEL)
    return code is grpc.StatusCode.INTERNAL and "RST_STREAM" in details


def identified(request: pb.GenerateRequest, policy: Resend | None) -> pb.GenerateRequest:
    """`request` with a request id when it may be resent: the caller's, or one drawn here (as the server would
    draw it), so that every attempt is the same request in the server's log."""
    if request.request_id or policy is None or policy.attempts == 1:
        return request
    copy = pb.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = uuid.uuid4().hex
    return copy


class Attempts:
    """One call's attempts under `policy` (None: a single one): the deadline each attempt gets, the header a
    resend carries, and whether (and after how long) a failure is sent again."""

    def __init__(
        self,
        policy: Resend | None,
        timeout: float | None,
        request_id: str,
        on_resend: OnResend | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or NO_RESEND
        self.request_id = request_id
        self.on_resend = on_resend
        self.number = 1  # the attempt being sent
        self._rng = rng or random.Random()
        self._started = time.monotonic()
        self._deadline = None if timeout is None else self._started + timeout

    def timeout(self) -> float | None:
        """What is left of the call's timeout, for the attempt about to be sent."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def metadata(self) -> list[tuple[str, str]]:
        return [(ATTEMPT_HEADER, str(self.number))] if self.number > 1 else []

    def after(self, error: grpc.RpcError, *, answered: bool, closed: bool = False) -> float | None:
        """The wait before the next attempt, or None when `error` ends the call: a response had arrived
        (`answered`), the client is closing (`closed`), the code is not one a resend fixes, or the attempts,
        budget or timeout are spent. Tells `on_resend` before returning a wait."""
        code: grpc.StatusCode = error.code()
        details: str = error.details() or ""
        if answered or closed or not resendable(code, details) or self.number >= self.policy.attempts:
            return None
        delay = self._rng.uniform(0, self.policy.backoff_s(self.number))
        start_by = self._started + self.policy.budget_s
        if self._deadline is not None:
            start_by = min(start_by, self._deadline)
        if time.monotonic() + delay > start_by:
            return None
        self.number += 1
        if self.on_resend is not None:
            self.on_resend(Resent(self.request_id, self.number, code, details, delay))
        return delay

    def note(self, error: Exception) -> Exception:
        """`error` with a note saying how many times the call was sent, when it was sent more than once."""
        if self.number > 1:
            error.add_note(f"sent {self.number} times as request {self.request_id} (refinery.client.resend)")
        return error
