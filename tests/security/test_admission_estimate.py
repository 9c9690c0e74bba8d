"""Admission's estimate cannot be poisoned by cheap requests (issue 21, item 1), through a real server.

The "device" here is a stand-in with a known cost (`timed_device` in conftest.py), so the verdicts do not
depend on how busy the test machine is: a fixed 0.2 s per run (prompt encoding, the decode) and 0.02 s x
(pixels / 256²) per step. A 64², 1-step request is nearly all fixed cost (0.2 s); a 256², 12-step one takes
about 0.44 s. One pace over every batch learnt from the cheap ones (0.004 megapixel-steps in 0.2 s) put the big
one at about 38 s and refused it with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import time

import grpc

from refinery.v1 import generation_pb2 as pb
from tests.integration.conftest import ServerThread, new_stub

from .test_bounded_cost import run_stream


def small(name: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(positive_prompt=name, width=64, height=64, steps=1)


def large(name: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(positive_prompt=name, width=256, height=256, steps=12)


def jobs_by_outcome(server: ServerThread, outcome: str) -> float:
    value = server.server.metrics.registry.get_sample_value("refinery_jobs_total", {"outcome": outcome})
    return value or 0.0


def test_cheap_requests_do_not_make_a_larger_one_look_too_slow(timed: ServerThread) -> None:
    with grpc.insecure_channel(timed.address) as channel:
        stub = new_stub(channel)
        for i in range(3):
            kinds, err = run_stream(stub, small(f"cheap {i}"))
            assert err is None, err
        # About 0.44 s of device time; the client waits 2 s.
        kinds, err = run_stream(stub, large("the larger one"), timeout=2)
    assert err is None, err.details()
    assert kinds.count("image") == 1


def test_mixed_traffic_has_no_false_refusals(timed: ServerThread) -> None:
    """One after another (nothing ahead of any of them), each with a deadline of four times what it takes:
    every refusal would be a false one."""
    refused: list[str] = []
    with grpc.insecure_channel(timed.address) as channel:
        stub = new_stub(channel)
        for i in range(12):
            request, deadline = (large(f"l{i}"), 1.8) if i % 4 == 3 else (small(f"s{i}"), 1.6)
            _, err = run_stream(stub, request, timeout=deadline)
            if err is not None:
                refused.append(f"{request.positive_prompt}: {err.code().name} {err.details()}")
    assert refused == []


def test_a_request_whose_own_history_says_it_is_too_slow_is_refused(timed: ServerThread) -> None:
    """The estimate still refuses what cannot fit: the same shape ran at 0.44 s; 60 steps of it need 1.4 s."""
    with grpc.insecure_channel(timed.address) as channel:
        stub = new_stub(channel)
        assert run_stream(stub, large("learn"))[1] is None
        request = pb.GenerateRequest(positive_prompt="too long", width=256, height=256, steps=60)
        kinds, err = run_stream(stub, request, timeout=0.9)
    assert err is not None and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "its deadline leaves" in err.details()  # refused by the server at admission, before any step
    assert "progress" not in kinds


def test_a_refusal_for_load_is_retryable_and_counted_rejected(timed: ServerThread) -> None:
    with grpc.insecure_channel(timed.address) as channel:
        stub = new_stub(channel)
        long_one = pb.GenerateRequest(positive_prompt="long", width=256, height=256, steps=60)
        assert run_stream(stub, long_one)[1] is None  # its shape is known: about 1.4 s
        assert run_stream(stub, small("learn small"))[1] is None
        rejected_before = jobs_by_outcome(timed, "rejected")
        failed_before = jobs_by_outcome(timed, "failed")
        running = stub.Generate(long_one, timeout=30)
        next(r for r in running if r.WhichOneof("event") == "progress")
        try:
            _, err = run_stream(stub, small("behind it"), timeout=0.7)
        finally:
            running.cancel()
    assert err is not None and err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "ahead of it" in err.details()
    deadline = time.monotonic() + 10  # the outcome is counted as the stream ends
    while jobs_by_outcome(timed, "rejected") == rejected_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert jobs_by_outcome(timed, "rejected") == rejected_before + 1
    assert jobs_by_outcome(timed, "failed") == failed_before
