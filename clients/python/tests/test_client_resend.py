"""The client resends a Generate that failed before any response with a status a resend can fix, against real
servers on loopback that fail the first calls (flaky_server.py): the same request id every time, counted, within
its bounds, and never after a response or for a status a resend cannot fix."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from flaky_server import FlakyGeneration, ResettingFront, serve

from refinery.client import AsyncClient, Client, Image, Queued, RefineryError
from refinery.client.resend import ATTEMPT_HEADER, Attempts, Resend, Resent

FAST = Resend(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
ANSWER = [Queued, Image]


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyGeneration, str]]:
    service = FlakyGeneration()
    for target in serve(service):
        yield service, target


def run(target: str, *, policy: Resend | None = FAST, **options: object) -> tuple[list[type], list[Resent]]:
    resent: list[Resent] = []
    with Client(target, resend=policy, on_resend=resent.append) as client:
        events = [type(e) for e in client.generate("a lighthouse", **options)]  # type: ignore[arg-type]
    return events, resent


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica"),
        (grpc.StatusCode.CANCELLED, "cancelled by the server: it stopped before the call started"),
    ],
)
def test_a_call_refused_before_any_response_is_resent_as_the_same_request(
    flaky: tuple[FlakyGeneration, str], code: grpc.StatusCode, details: str
) -> None:
    service, target = flaky
    service.failures, service.code, service.details = 2, code, details
    events, resent = run(target)
    assert events == ANSWER  # the third call's events, nothing of the failed ones
    ids = {call.request.request_id for call in service.calls}
    assert len(service.calls) == 3 and len(ids) == 1 and len(ids.pop()) == 32  # drawn once by the client
    assert [call.metadata.get(ATTEMPT_HEADER) for call in service.calls] == [None, "2", "3"]
    assert [(r.attempt, r.code) for r in resent] == [(2, code), (3, code)]
    assert all(0 <= r.delay_s <= FAST.max_backoff_s for r in resent)


def test_the_callers_request_id_is_kept(flaky: tuple[FlakyGeneration, str]) -> None:
    service, target = flaky
    service.failures = 1
    run(target, request_id="lighthouse-1")
    assert [call.request.request_id for call in service.calls] == ["lighthouse-1", "lighthouse-1"]


def test_a_stream_reset_before_any_message_is_resent(flaky: tuple[FlakyGeneration, str]) -> None:
    """nginx resets the client's stream (RST_STREAM INTERNAL_ERROR) when the replica's connection breaks after
    the response headers passed: INTERNAL, which a resend fixes when no message had arrived."""
    service, target = flaky
    front = ResettingFront(target, resets=1)
    try:
        events, resent = run(front.target)
    finally:
        front.close()
    assert events == ANSWER
    assert [(r.attempt, r.code) for r in resent] == [(2, grpc.StatusCode.INTERNAL)]
    assert "RST_STREAM" in resent[0].details
    assert len(service.calls) == 1  # the reset attempt never reached the server


def test_without_resend_a_reset_stream_is_the_callers_error(flaky: tuple[FlakyGeneration, str]) -> None:
    _, target = flaky
    front = ResettingFront(target, resets=1)
    try:
        with pytest.raises(RefineryError) as caught:
            run(front.target, policy=None)
    finally:
        front.close()
    assert caught.value.code is grpc.StatusCode.INTERNAL and "RST_STREAM" in caught.value.message


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,  # the server's own: a bug that the same request meets again
        grpc.StatusCode.UNKNOWN,
    ],
)
def test_a_status_a_resend_cannot_fix_is_never_resent(
    flaky: tuple[FlakyGeneration, str], code: grpc.StatusCode
) -> None:
    service, target = flaky
    service.failures, service.code, service.details = 1, code, "no"
    with pytest.raises(RefineryError) as caught:
        run(target)
    assert caught.value.code is code and len(service.calls) == 1


def test_a_stream_that_produced_events_is_never_resent(flaky: tuple[FlakyGeneration, str]) -> None:
    """Its progress was shown: a resend would start it again from nothing. The caller gets the failure."""
    service, target = flaky
    service.failures, service.answer_first = 1, True
    resent: list[Resent] = []
    events: list[object] = []
    with Client(target, resend=FAST, on_resend=resent.append) as client, pytest.raises(RefineryError) as caught:
        events.extend(client.generate("a lighthouse"))
    assert [type(e) for e in events] == [Queued]
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert len(service.calls) == 1 and resent == []


def test_attempts_bound_the_sends_and_the_error_says_how_many(flaky: tuple[FlakyGeneration, str]) -> None:
    service, target = flaky
    service.failures = 100
    with pytest.raises(RefineryError) as caught:
        run(target, policy=Resend(attempts=3, initial_backoff_s=0.01))
    assert len(service.calls) == 3
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert any("sent 3 times" in note for note in caught.value.__notes__)


def test_the_budget_and_the_timeout_bound_when_a_resend_may_start(flaky: tuple[FlakyGeneration, str]) -> None:
    service, target = flaky
    service.failures = 100
    started = time.monotonic()
    with pytest.raises(RefineryError):
        run(target, policy=Resend(attempts=100, budget_s=0.3, initial_backoff_s=0.05, max_backoff_s=0.1))
    assert time.monotonic() - started < 5 and 2 <= len(service.calls) < 100
    calls = len(service.calls)
    with pytest.raises(RefineryError):
        run(target, policy=Resend(attempts=100, initial_backoff_s=0.05, max_backoff_s=0.1), timeout=0.3)
    assert 2 <= len(service.calls) - calls < 100


def test_resending_can_be_switched_off(flaky: tuple[FlakyGeneration, str]) -> None:
    service, target = flaky
    service.failures = 2
    for policy in (None, Resend(attempts=1)):
        with pytest.raises(RefineryError):
            run(target, policy=policy)
    assert [call.request.request_id for call in service.calls] == ["", ""]  # the server assigns the id


def test_a_call_cancelled_by_closing_the_client_is_not_resent(flaky: tuple[FlakyGeneration, str]) -> None:
    service, target = flaky
    service.failures, service.hold = 1, threading.Event()
    client = Client(target, resend=FAST)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            list(client.generate("a lighthouse"))
        except RefineryError as error:
            outcome.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while not service.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    client.close()
    thread.join(10)
    service.hold.set()
    assert len(outcome) == 1 and outcome[0].code is grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    assert len(service.calls) == 1


def test_the_async_client_resends_the_same_way(flaky: tuple[FlakyGeneration, str]) -> None:
    service, target = flaky
    service.failures = 2
    resent: list[Resent] = []

    async def main() -> list[type]:
        async with AsyncClient(target, resend=FAST, on_resend=resent.append) as client:
            return [type(e) async for e in client.generate("a lighthouse")]

    assert asyncio.run(main()) == ANSWER
    assert len({call.request.request_id for call in service.calls}) == 1 and len(service.calls) == 3
    assert [r.attempt for r in resent] == [2, 3]

    service.calls.clear()
    service.failures, service.answer_first = 1, True

    async def answered() -> None:
        async with AsyncClient(target, resend=FAST) as client:
            async for _ in client.generate("a lighthouse"):
                pass

    with pytest.raises(RefineryError):
        asyncio.run(answered())
    assert len(service.calls) == 1


def test_the_backoff_is_jittered_and_grows_to_its_cap() -> None:
    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "down"

    policy = Resend(attempts=6, budget_s=1000, initial_backoff_s=1.0, max_backoff_s=4.0, multiplier=2.0)
    caps = [1.0, 2.0, 4.0, 4.0, 4.0]
    assert [policy.backoff_s(n) for n in range(1, 6)] == caps
    delays = []
    for seed in range(50):
        attempts = Attempts(policy, None, "r", rng=random.Random(seed))
        delays.append([attempts.after(Unavailable(), answered=False) for _ in range(6)])
    for row in delays:
        assert row[-1] is None  # the sixth failure is the last attempt
        assert all(0 <= d <= cap for d, cap in zip(row, caps, strict=False) if d is not None)
    assert len({row[0] for row in delays}) == 50  # random, not a fixed schedule
