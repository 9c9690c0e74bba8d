"""Request metadata the client sends: the pair-affinity header, the bearer token (the generation token, or
the admin token for administration), and with Generate the caller's trace context (tracing.py).

`refinery-pair: <model>+<refiner model>` lets an L7 load balancer hash requests for one model pair onto the
replica that already holds it (consistent hashing on a header). The value is built from the request's own
model strings, not canonical AIRs (a client cannot canonicalise without asking a server), so every client of
every language must build it the same way: each string as sent, empty when unset (`+` when both are the
server's defaults), the whole value percent-encoded with the same safe set so that it is printable ASCII, as
gRPC metadata must be.
"""

from __future__ import annotations

from urllib.parse import quote

from refinery.client.tracing import trace_metadata
from refinery.v1 import generation_pb2 as pb

PAIR_HEADER = "refinery-pair"
_PAIR_SAFE = ":@+/._-~"


def pair_affinity(model: str, refiner_model: str) -> str:
    return quote(f"{model}+{refiner_model}", safe=_PAIR_SAFE)


def bearer(token: str | None, admin_token: str | None, *, admin: bool) -> str | None:
    """The token a call sends: the admin token for administration, the generation token for the rest, each
    falling back to the other. The server takes either token for generation, and a client given one token only
    (an operator's admin token, a service's generation token) should send it rather than nothing."""
    return (admin_token or token) if admin else (token or admin_token)


def auth_metadata(token: str | None) -> list[tuple[str, str]]:
    """`authorization: Bearer <token>`, or nothing without a token."""
    return [("authorization", f"Bearer {token}")] if token else []


def generate_metadata(request: pb.GenerateRequest, token: str | None) -> list[tuple[str, str]]:
    """The pair-affinity header, the token, and the caller's OpenTelemetry trace context if it has one."""
    return pair_metadata(request.model, request.refiner.model, token)


def pair_metadata(model: str, refiner_model: str, token: str | None) -> list[tuple[str, str]]:
    """What a call for the pair `model` + `refiner_model` sends: Generate, and an UploadImage for requests of
    that pair (so that a balancer hashing on the pair puts the image where those requests run)."""
    return [(PAIR_HEADER, pair_affinity(model, refiner_model)), *auth_metadata(token), *trace_metadata()]
