"""Step-level batching through a real server (issue 19): requests that join a running batch at any step boundary,
and leave it when done, get the images and the progress they get alone on a static server, for every sampler,
with refiner hand-offs, compare and several results; cancel and deadline end one member only; a stream of small
requests cannot starve a large one."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import numpy
import pytest
from PIL import Image

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc

from .conftest import TIMEOUT_S, ServerThread, collect, events, make_settings, new_stub

TINY_REFINER = "builtin:tiny-sdxl-refiner@1"


def _server(
    store_settings: StoreSettings, model_store: ModelStore, **settings: Any
) -> Iterator[pb_grpc.GenerationServiceStub]:
    thread = ServerThread(make_settings(store_settings, **settings), store=model_store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as channel:
            yield new_stub(channel)
    finally:
        thread.close()


@pytest.fixture(scope="module")
def continuous(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[pb_grpc.GenerationServiceStub]:
    yield from _server(store_settings, model_store, batching="continuous", max_batch=8)


@pytest.fixture(scope="module")
def static(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[pb_grpc.GenerationServiceStub]:
    yield from _server(store_settings, model_store, batching="static", max_batch=8)


def request(index: int, **fields: Any) -> pb.GenerateRequest:
    fields.setdefault("positive_prompt", f"a harbour at dawn, boat number {index}")
    fields.setdefault("seed", 1000 + 17 * index)
    return pb.GenerateRequest(request_id=f"r{index}-{time.monotonic_ns()}", **fields)


# Six samplers, mixed steps, refiner starts, guidance, compare and results: everything that may differ in a run.
MIX: list[dict[str, Any]] = [
    {"scheduler": pb.SCHEDULER_EULER, "steps": 12, "refiner": pb.Refiner(model=TINY_REFINER, start_step=9)},
    {"scheduler": pb.SCHEDULER_EULER_ANCESTRAL, "steps": 9, "cfg_scale": 4.0,
     "refiner": pb.Refiner(model=TINY_REFINER, start_step=5, compare=True)},
    {"scheduler": pb.SCHEDULER_DDIM, "steps": 7, "number_results": 2},
    {"scheduler": pb.SCHEDULER_DPMPP_2M, "steps": 11, "refiner": pb.Refiner(model=TINY_REFINER, start_step=8),
     "number_results": 2},
    {"scheduler": pb.SCHEDULER_DPMPP_2M_KARRAS, "steps": 10, "cfg_scale": 1.0,
     "refiner": pb.Refiner(model=TINY_REFINER, start_step_percentage=70, compare=True)},
    {"scheduler": pb.SCHEDULER_UNIPC, "steps": 8, "negative_prompt": "blurry",
     "refiner": pb.Refiner(model=TINY_REFINER, start_step=6)},
]  # fmt: skip


def pixels(image: pb.Image) -> numpy.ndarray:
    return numpy.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"), dtype=numpy.int16)


def assert_same_images(got: list[pb.Image], alone: list[pb.Image]) -> None:
    assert [(i.index, i.branch, i.base_steps, i.refiner_steps) for i in got] == [
        (i.index, i.branch, i.base_steps, i.refiner_steps) for i in alone
    ]
    for image, solo in zip(got, alone, strict=True):
        # Denoised beside other requests, a result may differ from its solo run by floating-point rounding (CPU
        # kernels sum in another order for another batch): a level here and there, as batching has always had.
        differing = numpy.abs(pixels(image) - pixels(solo))
        assert differing.max() <= 2 and (differing > 0).mean() < 0.005, f"result {image.index} is not its solo run's"


def progress_of(responses: list[pb.GenerateResponse]) -> list[tuple[int, ...]]:
    return [
        (p.stage, p.step, p.stage_steps, p.overall_step, p.total_steps, p.branch, *p.image_indices)
        for p in events(responses, "progress")
    ]


def stream(stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(stub.Generate(req, timeout=TIMEOUT_S))


def test_requests_joining_at_every_step_equal_their_solo_runs(
    continuous: pb_grpc.GenerationServiceStub, static: pb_grpc.GenerationServiceStub
) -> None:
    """A long anchor runs; request k joins after the anchor's k-th step, so joins land on consecutive step
    boundaries, and the shorter ones leave while others still step."""
    anchor = request(99, steps=30, scheduler=pb.SCHEDULER_DPMPP_2M)
    joiners = [request(k, **fields) for k, fields in enumerate(MIX)]
    futures: list[Future[list[pb.GenerateResponse]]] = []
    with ThreadPoolExecutor(len(joiners)) as pool:
        anchor_responses = []
        for response in continuous.Generate(anchor, timeout=TIMEOUT_S):
            anchor_responses.append(response)
            if response.WhichOneof("event") == "progress" and len(futures) < len(joiners):
                futures.append(pool.submit(stream, continuous, joiners[len(futures)]))
        together = [f.result() for f in futures]
    for req, responses in zip([anchor, *joiners], [anchor_responses, *together], strict=True):
        alone = collect(static, req)
        assert progress_of(responses) == progress_of(alone), f"{req.request_id}: its progress events differ"
        assert_same_images(events(responses, "image"), events(alone, "image"))


def test_a_cancelled_member_leaves_the_others_exact(
    continuous: pb_grpc.GenerationServiceStub, static: pb_grpc.GenerationServiceStub
) -> None:
    kept = [request(k, **fields) for k, fields in enumerate(MIX[:3])]
    with ThreadPoolExecutor(4) as pool:
        to_cancel = continuous.Generate(request(50, steps=40), timeout=TIMEOUT_S)
        futures = [pool.submit(stream, continuous, req) for req in kept]
        for seen, _response in enumerate(r for r in to_cancel if r.WhichOneof("event") == "progress"):
            if seen == 2:
                to_cancel.cancel()
                break
        with pytest.raises(grpc.RpcError) as cancelled:
            next(to_cancel)
        assert cancelled.value.code() is grpc.StatusCode.CANCELLED
        results = [f.result() for f in futures]
    for req, responses in zip(kept, results, strict=True):
        assert_same_images(events(responses, "image"), events(collect(static, req), "image"))


def test_a_missed_deadline_ends_its_request_only(
    continuous: pb_grpc.GenerationServiceStub, static: pb_grpc.GenerationServiceStub
) -> None:
    # Seven images of 150 steps take far longer than the deadline on any CPU. Without guidance and without a
    # refiner it is a kind no request of this module ran before, so admission has no pace to refuse it by (it
    # would: the deadline cannot be met) and it runs, as a member of the run, until its deadline passes.
    late_request = request(61, steps=150, number_results=7, cfg_scale=1.0)
    other = request(60, steps=40, scheduler=pb.SCHEDULER_EULER_ANCESTRAL)
    with ThreadPoolExecutor(2) as pool:
        late = pool.submit(stream_until_error, continuous, late_request, 0.6)
        time.sleep(0.1)
        beside = pool.submit(stream, continuous, other)  # joins the late one's run
        assert late.result() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert_same_images(events(beside.result(), "image"), events(collect(static, other), "image"))


def stream_until_error(stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest, timeout: float) -> Any:
    try:
        list(stub.Generate(req, timeout=timeout))
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_stream_of_small_requests_never_starves_a_large_one(
    store_settings: StoreSettings, model_store: ModelStore
) -> None:
    """With room for 4 images, a running request of 1, then a request of 4 and a stream of requests of 1: no
    request submitted after the large one takes its first step before it."""
    first_step: dict[str, float] = {}
    lock = threading.Lock()

    def run(stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest) -> None:
        for response in stub.Generate(req, timeout=TIMEOUT_S):
            if response.WhichOneof("event") == "progress":
                with lock:
                    first_step.setdefault(req.request_id, time.monotonic())

    for stub in _server(store_settings, model_store, batching="continuous", max_batch=4):
        with ThreadPoolExecutor(12) as pool:
            pool.submit(run, stub, pb.GenerateRequest(request_id="running", positive_prompt="x", steps=25))
            while "running" not in first_step:
                time.sleep(0.01)
            large = pool.submit(run, stub, pb.GenerateRequest(request_id="large", positive_prompt="y", steps=6,
                                                              number_results=4))  # fmt: skip
            time.sleep(0.2)  # queued behind the running request: no room for 4 images while it runs
            small = [
                pool.submit(run, stub, pb.GenerateRequest(request_id=f"small{k}", positive_prompt="z", steps=6))
                for k in range(8)
            ]
            for future in [large, *small]:
                future.result()
    assert all(first_step["large"] <= first_step[f"small{k}"] for k in range(8))
