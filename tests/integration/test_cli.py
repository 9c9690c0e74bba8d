"""The `refinery` command as a user runs it: a real process, real files, real gRPC."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from modelstore import StoreSettings
from refinery.v1 import generation_pb2 as pb
from server.cli.generate import build_request, output_path, parse_refiner_start, parse_size
from server.cli.main import build_parser
from server.cli.serve import server_settings
from server.core.settings import Speed, Toggle

from .conftest import ServerThread

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # a hang fails the test; never an expectation about speed


def refinery(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFINERY_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


# ---- flags -------------------------------------------------------------------------------------------------


def test_refiner_start_accepts_percentages_and_steps() -> None:
    assert parse_refiner_start("90%") == ("start_step_percentage", 90)
    assert parse_refiner_start(" 85 % ") == ("start_step_percentage", 85)
    assert parse_refiner_start("18") == ("start_step", 18)
    for bad in ("", "%", "-3", "ninety", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_refiner_start(bad)


def test_size() -> None:
    assert parse_size("1024x768") == (1024, 768)
    assert parse_size("512") == (512, 512)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("big")


def test_output_paths_get_an_index_with_several_results() -> None:
    assert output_path(Path("out/demo.png"), 0, 1) == Path("out/demo.png")
    assert [output_path(Path("out/demo.png"), i, 3) for i in range(3)] == [
        Path("out/demo-0.png"),
        Path("out/demo-1.png"),
        Path("out/demo-2.png"),
    ]


def test_flags_become_the_request() -> None:
    args = build_parser({}).parse_args(
        ["generate", "a cat", "--refiner-start", "80%", "--steps", "25", "--seed", "0", "-n", "2",
         "--size", "128x64", "--scheduler", "dpmpp_2m_karras", "-o", "x.webp",
         "--negative", "blurry", "--cfg", "5"]
    )  # fmt: skip
    request = build_request(args)
    assert request.HasField("seed") and request.seed == 0
    assert request.refiner.model == ""  # --refiner-start alone: the server's default refiner
    assert request.refiner.WhichOneof("start") == "start_step_percentage"
    assert request.refiner.start_step_percentage == 80
    assert (request.steps, request.number_results, request.width, request.height) == (25, 2, 128, 64)
    assert request.scheduler == pb.SCHEDULER_DPMPP_2M_KARRAS
    assert request.output_format == pb.OUTPUT_FORMAT_WEBP  # from the file name
    assert (request.negative_prompt, request.cfg_scale) == ("blurry", 5.0)

    plain = build_request(build_parser({}).parse_args(["generate", "a cat"]))
    assert not plain.HasField("refiner") and not plain.HasField("seed")
    assert plain.output_format == pb.OUTPUT_FORMAT_PNG


def test_serve_flags_win_over_the_environment_which_wins_over_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def settings(*flags: str, **env: str) -> Any:
        args = build_parser(env).parse_args(["serve", "--cache-dir", str(tmp_path), *flags])
        return server_settings(args, env, in_process=False)

    defaults = settings()
    assert (defaults.max_batch, defaults.max_queue, defaults.encode_threads) == (4, 64, 2)
    from_env = settings(REFINERY_MAX_BATCH="2", REFINERY_ENCODE_THREADS="0")
    assert (from_env.max_batch, from_env.encode_threads) == (2, 0)
    flagged = settings("--max-batch", "8", "--encode-threads", "3", REFINERY_ENCODE_THREADS="0")
    assert (flagged.max_batch, flagged.encode_threads) == (8, 3)
    with pytest.raises(SystemExit) as refused:  # argparse: one line, exit code 2
        settings(REFINERY_ENCODE_THREADS="-1")
    assert refused.value.code == 2
    assert "--encode-threads: must be 0 or more, got -1 (from REFINERY_ENCODE_THREADS)" in capsys.readouterr().err


def test_speed_flags_come_from_flags_or_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def speed(*flags: str, **env: str) -> Speed:
        args = build_parser(env).parse_args(["serve", "--cache-dir", str(tmp_path), *flags])
        return server_settings(args, env, in_process=False).speed

    assert speed() == Speed()  # auto everywhere: tuned on CUDA, today's path on the CPU
    chosen = speed("--compile", "max-autotune", "--fuse-qkv", "off", "--png-level", "6", REFINERY_VAE_DECODE="bfloat16")
    assert (chosen.compile, chosen.fuse_qkv, chosen.vae_decode, chosen.png_level) == (
        "max-autotune",
        Toggle.OFF,
        "bfloat16",
        6,
    )
    assert speed(REFINERY_COMPILE_CACHE=str(tmp_path / "c")).compile_cache_dir == tmp_path / "c"
    with pytest.raises(SystemExit) as refused:
        speed(REFINERY_COMPILE="fast")
    assert refused.value.code == 2
    assert "--compile: expected one of auto, off, default, reduce-overhead" in capsys.readouterr().err


def test_serve_refuses_fp8_where_the_device_has_none(tmp_path: Path) -> None:
    result = refinery("serve", "--devices", "cpu", "--port", "0", "--fp8", "on", cache=tmp_path, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "refinery: error: --fp8 needs a CUDA GPU with FP8 (compute capability 8.9+); cpu has none"
    )


# ---- generate ----------------------------------------------------------------------------------------------


def test_generate_in_process_writes_a_png_and_shows_both_stages(tmp_path: Path, store_settings: StoreSettings) -> None:
    result = refinery(
        "generate", "a lighthouse on a cliff", "--refiner", "builtin:tiny-sdxl-refiner@1", "--steps", "10",
        "--seed", "7", "-o", "out/demo.png", cache=store_settings.cache_dir, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "demo.png") as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    progress = result.stderr
    assert "base" in progress and "9/9" in progress  # 90 % of 10: 9 base steps ...
    assert "refiner" in progress and "1/1" in progress  # ... and 1 refiner step
    assert "loaded base builtin:tiny-sdxl-base@1" in progress
    assert "queued: runs next (1 in the queue, this one included)" in progress
    assert "WARNING" not in progress  # the in-process server listens on loopback: open access is no warning there
    assert "seed 7" in result.stdout and "out/demo.png" in result.stdout


def test_generate_against_a_server_writes_every_result(tmp_path: Path, server: ServerThread) -> None:
    result = refinery(
        "generate", "a cat", "--server", server.address, "--steps", "3", "--seed", "40", "-n", "2",
        "--format", "jpeg", "-o", "cat.jpg", "--preview-every", "3", "--previews", "previews",
        cache=tmp_path / "unused-cache", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for index, seed in ((0, 40), (1, 41)):
        with Image.open(tmp_path / f"cat-{index}.jpg") as image:
            assert image.format == "JPEG"
        assert f"cat-{index}.jpg (64x64, image/jpeg, seed {seed})" in result.stdout
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [
        "cat-preview-003-0.jpg",
        "cat-preview-003-1.jpg",
    ]


def test_generate_reports_bad_fields_in_one_line(tmp_path: Path, server: ServerThread) -> None:
    result = refinery(
        "generate", "a cat", "--server", server.address, "--steps", "20", "--refiner-start", "30",
        cache=tmp_path, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: INVALID_ARGUMENT: refiner.start_step: must be in 2..steps (2..20 without an image), got 30"
    )
    assert not (tmp_path / "out.png").exists()


def test_generate_reports_an_unknown_model(tmp_path: Path, server: ServerThread) -> None:
    result = refinery(
        "generate",
        "a cat",
        "--server",
        server.address,
        "--model",
        "builtin:nope@1",
        cache=tmp_path,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: NOT_FOUND: model: ") and "builtin:nope@1" in last


def test_flags_out_of_range_are_usage_errors(tmp_path: Path) -> None:
    negative = refinery("generate", "a cat", "--steps", "-1", "--server", "localhost:1", cache=tmp_path, cwd=tmp_path)
    assert negative.returncode == 2 and "--steps: expected a whole number >= 0" in negative.stderr
    huge = refinery("generate", "a cat", "--seed", str(2**64), "--server", "localhost:1", cache=tmp_path, cwd=tmp_path)
    assert huge.returncode == 2 and huge.stderr.startswith("refinery: error: a value is out of range")


# ---- serve -------------------------------------------------------------------------------------------------


@pytest.fixture
def free_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def test_serve_becomes_ready_and_stops_on_sigterm(store_settings: StoreSettings, free_port: int) -> None:
    env = {**os.environ, "REFINERY_CACHE_DIR": str(store_settings.cache_dir), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{free_port}") as chan:
            grpc.channel_ready_future(chan).result(timeout=TIMEOUT_S)
            watch = health_pb2_grpc.HealthStub(chan).Watch(
                health_pb2.HealthCheckRequest(service="refinery.v1.GenerationService"), timeout=TIMEOUT_S
            )
            for update in watch:
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            watch.cancel()
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, log
    assert "pinning builtin:tiny-sdxl-base@1+builtin:tiny-sdxl-refiner@1" in log
    assert "signal received; shutting down" in log and "stopped" in log
