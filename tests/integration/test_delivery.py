"""Images of any size reach a client that never raised gRPC's default 4 MiB receive limit (as chunks its
helper reassembles), and an image its client could not take is a failure in the log and the metrics, never ok."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence

import grpc
import numpy
import pytest
from PIL import Image

from modelstore import ModelStore, StoreSettings
from refinery.client import Client
from refinery.client import Image as ClientImage
from refinery.v1 import generation_pb2 as pb
from server.core.domain import RenderShape, Sample
from server.generation.pipelines import PipelinePair
from server.generation.runner import RunResult, StageTimings, StepObserver

from .conftest import TIMEOUT_S, ServerThread, make_settings, new_stub

DEFAULT_LIMIT = 4 * 1024 * 1024  # every gRPC library's default receive limit
SIDE = 2048


class NoiseRunner:
    """Stands in for the two-stage runner: a 2048x2048 image of noise per sample (a ~12 MB PNG)."""

    def __init__(self) -> None:
        self.images: list[Image.Image] = []

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult:
        rng = numpy.random.default_rng(samples[0].seed)
        self.images = [
            Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=numpy.uint8), mode="RGB") for _ in samples
        ]
        return RunResult(list(self.images), StageTimings())


@pytest.fixture(scope="module")
def noisy(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[tuple[ServerThread, NoiseRunner]]:
    runner = NoiseRunner()
    thread = ServerThread(make_settings(store_settings), store=model_store, run=runner)
    try:
        thread.wait_ready()
        yield thread, runner
    finally:
        thread.close()


def test_a_large_image_arrives_in_chunks_under_the_default_limit(noisy: tuple[ServerThread, NoiseRunner]) -> None:
    thread, runner = noisy
    with grpc.insecure_channel(thread.address) as channel:  # gRPC's defaults: a 4 MiB receive limit
        responses = list(new_stub(channel).Generate(pb.GenerateRequest(positive_prompt="noise", steps=2, seed=3)))
    chunks = [r.image_chunk for r in responses if r.WhichOneof("event") == "image_chunk"]
    assert len(chunks) >= 3 and not [r for r in responses if r.WhichOneof("event") == "image"]
    assert all(r.ByteSize() < DEFAULT_LIMIT for r in responses)
    assert [c.offset for c in chunks] == [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
    assert [c.HasField("image") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    data = b"".join(c.data for c in chunks)
    assert len(data) == chunks[0].total_size
    png = Image.open(io.BytesIO(data))
    assert png.size == (SIDE, SIDE) and png.tobytes() == runner.images[0].tobytes()
    assert (chunks[-1].image.width, chunks[-1].image.seed, chunks[-1].image.data) == (SIDE, 3, b"")


def test_the_python_client_reassembles_them(noisy: tuple[ServerThread, NoiseRunner]) -> None:
    thread, runner = noisy
    with Client(thread.address, max_receive_bytes=DEFAULT_LIMIT) as client:
        images = [e for e in client.generate("noise", steps=2, seed=4, timeout=TIMEOUT_S) if isinstance(e, ClientImage)]
    (image,) = images
    assert Image.open(io.BytesIO(image.data)).tobytes() == runner.images[0].tobytes()
    assert (image.width, image.height, image.seed) == (SIDE, SIDE, 4)


def test_an_image_the_client_could_not_take_is_a_failure_not_ok(
    noisy: tuple[ServerThread, NoiseRunner], caplog: pytest.LogCaptureFixture
) -> None:
    thread, _ = noisy
    caplog.set_level(logging.INFO, logger="server.scheduling.ticket")
    registry = thread.server.metrics.registry

    def count(outcome: str) -> float:
        return registry.get_sample_value("refinery_jobs_total", {"outcome": outcome}) or 0.0

    ok_before, failed_before = count("ok"), count("failed")
    options = [("grpc.max_receive_message_length", 1024 * 1024)]  # smaller than one chunk
    request = pb.GenerateRequest(request_id="too-small", positive_prompt="noise", steps=2, seed=5)
    with grpc.insecure_channel(thread.address, options=options) as channel, pytest.raises(grpc.RpcError) as caught:
        list(new_stub(channel).Generate(request, timeout=TIMEOUT_S))
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # the client's own refusal
    lines = _log_lines(caplog, "request too-small ")
    assert len(lines) == 1 and lines[0].startswith("request too-small failed (DeliveryFailed)")
    assert (count("ok"), count("failed")) == (ok_before, failed_before + 1)


def _log_lines(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    """The request's log line(s), once there is one: the server writes it when the call has ended there."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (lines := [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]):
        assert time.monotonic() < deadline, "the request was never logged"
        time.sleep(0.01)
    return lines
