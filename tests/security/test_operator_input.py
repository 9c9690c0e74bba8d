"""Issue 13, finding 8 (the server's share): every flag and environment value is checked, and a bad one ends
`refinery serve` with one clear line and exit code 2, never a traceback; a prompt of control characters is
blank.

`--budget 1B`: one byte is a size, so the flag accepts it (a floor would be arbitrary: models run from a few MB
to 7 GB). What it cannot hold is refused where that is known, in one line each: a pinned pair that cannot fit
is a pin failure (logged, in GetStatus, the server not ready), as a damaged pinned model is; a request whose
models cannot fit is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from tests.integration.conftest import ServerThread, make_settings, new_stub

from .conftest import TIMEOUT_S, ServeProcess, env_for_cli, refinery, wait_until

# (flags, environment, what the one line must name)
BAD_INPUT: dict[str, tuple[list[str], dict[str, str], str]] = {
    "negative grace": (["--grace", "-5"], {}, "--grace"),
    "grace that is not a number": (["--grace", "nan"], {}, "--grace"),
    "negative drain delay": (["--drain-delay", "-1"], {}, "--drain-delay"),
    "negative budget": (["--budget", "-5"], {}, "--budget"),
    "budget that is not a size": (["--budget", "lots"], {}, "--budget"),
    "cache quota that is not a size": ([], {"REFINERY_CACHE_MAX_BYTES": "abc"}, "REFINERY_CACHE_MAX_BYTES"),
    "negative cache quota": ([], {"REFINERY_CACHE_MAX_BYTES": "-1"}, "REFINERY_CACHE_MAX_BYTES"),
    "port out of range": (["--port", "70000"], {}, "--port"),
    "port that is not a number": (["--port", "http"], {}, "--port"),
    "port from the environment": ([], {"REFINERY_PORT": "-1"}, "REFINERY_PORT"),
    "health port": (["--health-port", "65536"], {}, "--health-port"),
    "pin that is not an AIR": (["--pin", "garbage"], {}, "--pin"),
    "pin with a bad refiner": (["--pin", "builtin:tiny-sdxl-base@1+nope"], {}, "--pin"),
    "pin of three models": (["--pin", "builtin:a@1+builtin:b@1+builtin:c@1"], {}, "--pin"),
    "pins from the environment": ([], {"REFINERY_PINS": "x"}, "REFINERY_PINS"),
    "work limit": (["--max-work", "0"], {}, "--max-work"),
    "token file that is missing": ([], {"REFINERY_TOKEN_FILE": "/nonexistent/token"}, "REFINERY_TOKEN_FILE"),
}


def one_error_line(stderr: str) -> str:
    """The single error line (argparse prints its usage above it); no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


def test_bad_flags_and_environment_values_end_in_one_line_and_exit_code_2(tmp_path: Path) -> None:
    def attempt(case: str) -> tuple[str, int, str]:
        flags, env, _ = BAD_INPUT[case]
        cli_env = env_for_cli(REFINERY_CACHE_DIR=str(tmp_path / "cache"), **env)
        done = refinery("serve", *flags, cwd=tmp_path, env=cli_env, timeout=60)  # one that starts fails
        return case, done.returncode, done.stderr

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, BAD_INPUT))
    for case, code, stderr in results:
        assert code == 2, (case, stderr)
        assert BAD_INPUT[case][2] in one_error_line(stderr), case


def test_a_tls_file_that_cannot_be_read_ends_in_one_line_and_exit_code_2(tmp_path: Path) -> None:
    env = env_for_cli(REFINERY_CACHE_DIR=str(tmp_path / "cache"))
    missing = str(tmp_path / "missing.pem")
    done = refinery(
        "serve", "--port", "0", "--pin", "none", "--tls-cert", missing, "--tls-key", missing, cwd=tmp_path, env=env
    )
    assert done.returncode == 2
    assert "--tls-cert" in one_error_line(done.stderr)


def test_a_budget_smaller_than_any_model_is_accepted_and_every_request_refused(serve_process: Any) -> None:
    server: ServeProcess = serve_process("--budget", "1B")  # the default pair pinned
    with grpc.insecure_channel(server.address) as channel:
        wait_until(lambda: "not ready" in server.log, "the pin has failed")
        health = health_pb2_grpc.HealthStub(channel)
        ready = health.Check(health_pb2.HealthCheckRequest(service="refinery.v1.GenerationService"), timeout=TIMEOUT_S)
        assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            list(new_stub(channel).Generate(pb.GenerateRequest(positive_prompt="a cat", steps=2), timeout=TIMEOUT_S))
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cannot fit on any device" in (caught.value.details() or "")
    pin_failure = [line for line in server.lines if "could not pin" in line]
    assert len(pin_failure) == 1 and "(budget 1 B)" in pin_failure[0]
    assert "Traceback" not in server.log


# ---- prompts ------------------------------------------------------------------------------------------------


def violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(err)
    assert status is not None
    found: list[tuple[str, str]] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.extend((v.field, v.reason) for v in bad.field_violations)
    return found


@pytest.mark.parametrize(
    "prompt",
    ["\x00", "\x00" * 64, "\x00 \t\x1b\x7f", "\u200b\u202e\ufeff"],
    ids=["one NUL", "NULs", "control characters", "invisible formatting"],
)
def test_a_prompt_of_control_characters_is_blank(
    store_settings: StoreSettings, model_store: ModelStore, prompt: str
) -> None:
    thread = ServerThread(make_settings(store_settings, pins=()), store=model_store)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = new_stub(channel)
            with pytest.raises(grpc.RpcError) as base:
                list(stub.Generate(pb.GenerateRequest(positive_prompt=prompt), timeout=TIMEOUT_S))
            refined = pb.GenerateRequest(positive_prompt="a cat", refiner=pb.Refiner(positive_prompt=prompt))
            with pytest.raises(grpc.RpcError) as refiner:
                list(stub.Generate(refined, timeout=TIMEOUT_S))
    finally:
        thread.close()
    assert base.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(base.value) == [("positive_prompt", "REQUIRED")]
    assert refiner.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(refiner.value) == [("refiner.positive_prompt", "REQUIRED")]
