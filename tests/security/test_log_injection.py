"""Issue 13, findings 5 and 6: what a client sends cannot forge a log line, flood the log, or turn into a
traceback. Client text in a log line is escaped and cut; a request that is not valid protobuf gets
INVALID_ARGUMENT and one quiet line; an error that quotes a huge client text still reaches the client."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import models_pb2, models_pb2_grpc
from server.core.settings import Security
from tests.integration.conftest import ServerThread, bad_request_fields, make_settings, new_stub

from .conftest import TIMEOUT_S, answer_of

FORGED = "2026-01-01 00:00:00,000 WARNING server.app: FORGED admin token accepted"
# Under the request limit, so it reaches the server and its log; the 1 MiB one is refused by gRPC itself.
LONG = 100_000
# What one refused request may add to the log, at most: a few lines of a few hundred characters.
LOGGED_PER_REQUEST = 4_000


@pytest.fixture(scope="module")
def server(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    thread = ServerThread(
        make_settings(store_settings, pins=(), security=Security(trust_loopback_admin=True)), store=model_store
    )
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """Every message logged so far in the test, at any level."""
    caplog.set_level(logging.DEBUG)
    return lambda: [record.getMessage() for record in caplog.records]


def assert_clean(messages: list[str], hostile: str) -> None:
    assert not any("\n" in m or "\r" in m for m in messages), "a client text wrote a line of its own"
    assert sum(len(m) for m in messages) < LOGGED_PER_REQUEST, f"{sum(len(m) for m in messages)} characters logged"
    assert not any(hostile[:300] in m for m in messages)  # never echoed verbatim at length


def generate(server: ServerThread, request: pb.GenerateRequest) -> Any:
    with grpc.insecure_channel(server.address) as channel:
        return answer_of(lambda: list(new_stub(channel).Generate(request, timeout=TIMEOUT_S)))


@pytest.mark.parametrize(
    "request_id",
    [f"r1\n{FORGED}", f"r1\r\n{FORGED}", "\x1b[2J\x1b[H" + FORGED, "x" * LONG + f"\n{FORGED}", "\u202e" + FORGED],
    ids=["newline", "crlf", "terminal escapes", "100 KB", "bidi override"],
)
def test_a_refused_request_id_neither_forges_nor_floods_the_log(
    server: ServerThread, logged: Callable[[], list[str]], request_id: str
) -> None:
    answer = generate(server, pb.GenerateRequest(request_id=request_id, positive_prompt="a cat"))
    assert answer.code is grpc.StatusCode.INVALID_ARGUMENT
    messages = logged()
    assert any("Generate" in m and "INVALID_ARGUMENT" in m for m in messages)  # it is logged, escaped
    assert_clean(messages, request_id)


def test_a_one_mib_request_id_is_refused_before_it_is_read(
    server: ServerThread, logged: Callable[[], list[str]]
) -> None:
    answer = generate(server, pb.GenerateRequest(request_id="x" * (1 << 20) + f"\n{FORGED}", positive_prompt="a"))
    assert answer.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_clean(logged(), "x" * 300)


@pytest.mark.parametrize("field", ["model", "refiner.model"])
def test_a_huge_hostile_model_name_is_answered_and_logged_within_bounds(
    server: ServerThread, logged: Callable[[], list[str]], field: str
) -> None:
    hostile = "\n" + FORGED + "x" * LONG
    request = pb.GenerateRequest(positive_prompt="a cat", steps=4)
    if field == "model":
        request.model = hostile
    else:
        request.refiner.model = hostile
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(new_stub(channel).Generate(request, timeout=TIMEOUT_S))
        # The client gets its INVALID_ARGUMENT naming the field, not a status too big for its trailers.
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(caught.value) == [field]
        assert len(caught.value.details() or "") < 2_000
        pull = models_pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        pulled = answer_of(lambda: list(pull.PullModel(models_pb2.PullModelRequest(model=hostile), timeout=TIMEOUT_S)))
        assert pulled.code is grpc.StatusCode.INVALID_ARGUMENT
    assert_clean(logged(), hostile)


# ---- malformed protobuf -------------------------------------------------------------------------------------

MALFORMED = {
    "a lone byte": b"\xff",
    "a truncated length": b"\x0a\xff",
    "a string that is not UTF-8": b"\x0a\x02\xff\xfe",
    "a field past the end": b"\x12\x05abc",
    "a varint that never ends": b"\x08" + b"\xff" * 11,
    "an end-group without a start": b"\x0c",
    "groups nested past the recursion limit": b"\x0b" * 200 + b"\x0c" * 200,
}
# (GetStatus is not here: its request has no fields, so all but broken framing parses as unknown fields.)
METHODS = {
    "/refinery.v1.GenerationService/Generate": ("GenerateRequest", True),
    "/refinery.v1.ServerService/PinPair": ("PinPairRequest", False),
    "/refinery.v1.ModelService/PullModel": ("PullModelRequest", True),
}


@pytest.mark.parametrize("method", METHODS)
def test_malformed_protobuf_is_invalid_argument_without_a_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.DEBUG)
    type_name, streaming = METHODS[method]
    with grpc.insecure_channel(server.address) as channel:
        kind = channel.unary_stream if streaming else channel.unary_unary
        call = kind(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        for name, raw in MALFORMED.items():
            answer = answer_of(lambda: call(raw, timeout=TIMEOUT_S))  # noqa: B023
            assert (answer.code, answer.details) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {type_name}",
            ), name
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "Traceback" not in caplog.text
