"""A request's one log line tells where its time went, also when it ended mid-run (issue 21, item 10: a
cancelled request logged `base 0.000s` after running steps)."""

from __future__ import annotations

import logging
import re

import grpc
import pytest

from refinery.v1 import generation_pb2 as pb
from tests.integration.conftest import ServerThread, new_stub

from .test_bounded_cost import outcome_line, run_stream


def test_a_request_ended_mid_run_logs_the_time_its_steps_took(
    timed: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.scheduling.ticket")
    # 60 steps of 0.02 s: the client's deadline passes after about 25 of them.
    request = pb.GenerateRequest(request_id="cut-short", positive_prompt="x", width=256, height=256, steps=60)
    with grpc.insecure_channel(timed.address) as channel:
        stub = new_stub(channel)
        assert run_stream(stub, pb.GenerateRequest(positive_prompt="load the pair", steps=1))[1] is None
        kinds, err = run_stream(stub, request, timeout=0.6)
    assert err is not None and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED and "progress" in kinds
    line = outcome_line(caplog, "cut-short")
    found = re.search(r"base (\d+\.\d+)s", line)
    assert found is not None, line
    assert float(found.group(1)) >= 0.1, line  # at least the steps it reported (5 or more at 0.02 s)
    assert "decode 0.000s" in line  # it never decoded
