"""Compare (the refined image and the base's own from one run) and the refiner's own controls, through a real
gRPC server on loopback with the tiny built-in pair (issue 11)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy
import pytest
from PIL import Image

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.core.domain import RenderShape, Sample
from server.generation import runner
from server.generation.pipelines import PipelinePair
from server.generation.runner import RunResult, StepObserver
from server.scheduling.ticket import Ticket

from .conftest import TIMEOUT_S, ServerThread, bad_request_fields, collect, events, make_settings, new_stub
from .test_generate import _ByHand

TINY_BASE = "builtin:tiny-sdxl-base@1"
TINY_REFINER = "builtin:tiny-sdxl-refiner@1"
SAMPLERS = [
    pb.SCHEDULER_EULER,
    pb.SCHEDULER_EULER_ANCESTRAL,
    pb.SCHEDULER_DDIM,
    pb.SCHEDULER_DPMPP_2M,
    pb.SCHEDULER_DPMPP_2M_KARRAS,
    pb.SCHEDULER_UNIPC,
]


def request(*, refiner: pb.Refiner | None = None, **fields: Any) -> pb.GenerateRequest:
    defaults: dict[str, Any] = {"positive_prompt": "a lighthouse on a cliff", "steps": 6, "seed": 42}
    message = pb.GenerateRequest(**{**defaults, **fields})
    if refiner is not None:
        message.refiner.CopyFrom(refiner)
    return message


def rgb(image: pb.Image) -> bytes:
    return Image.open(io.BytesIO(image.data)).convert("RGB").tobytes()


def pictures(images: list[pb.Image]) -> list[bytes]:
    return [rgb(i) for i in images]


def levels(image: pb.Image) -> numpy.ndarray[Any, Any]:
    return numpy.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"), dtype=numpy.int16)


def branch_images(responses: list[pb.GenerateResponse], branch: int) -> list[pb.Image]:
    return [i for i in events(responses, "image") if i.branch == branch]


# ---- the stream --------------------------------------------------------------------------------------------


def test_the_stream_says_which_branch_each_event_belongs_to(stub: pb_grpc.GenerationServiceStub) -> None:
    responses = collect(
        stub,
        request(
            steps=10,
            number_results=2,
            preview_every=3,
            refiner=pb.Refiner(model=TINY_REFINER, start_step=8, compare=True),
        ),
    )
    unspecified, alone = pb.BRANCH_UNSPECIFIED, pb.BRANCH_BASE_ONLY
    progress = [(p.stage, p.branch, p.step, p.stage_steps, p.overall_step) for p in events(responses, "progress")]
    # 7 shared base steps, the base alone for steps 8..10, then the refiner's 3: 13 steps, counted in run order.
    assert progress == (
        [(pb.STAGE_BASE, unspecified, i, 7, i) for i in range(1, 8)]
        + [(pb.STAGE_BASE, alone, i, 10, i) for i in range(8, 11)]
        + [(pb.STAGE_REFINER, unspecified, i, 3, 10 + i) for i in range(1, 4)]
    )
    assert {p.total_steps for p in events(responses, "progress")} == {13}
    assert all(list(p.image_indices) == [0, 1] for p in events(responses, "progress"))

    previews = [(p.overall_step, p.branch, p.stage, p.image_index) for p in events(responses, "preview")]
    assert previews == [
        (step, branch, stage, index)
        for step, branch, stage in [
            (3, unspecified, pb.STAGE_BASE),
            (6, unspecified, pb.STAGE_BASE),
            (9, alone, pb.STAGE_BASE),
            (12, unspecified, pb.STAGE_REFINER),
        ]
        for index in (0, 1)
    ]

    images = [
        (i.branch, i.index, i.seed, i.base_steps, i.refiner_steps, i.refiner_model) for i in events(responses, "image")
    ]
    assert images == [
        (alone, 0, 42, 10, 0, ""),
        (alone, 1, 43, 10, 0, ""),
        (unspecified, 0, 42, 7, 3, TINY_REFINER),
        (unspecified, 1, 43, 7, 3, TINY_REFINER),
    ]
    # A client that ignores `branch` and keeps the last image per index keeps the refined images.
    last = {i.index: i for i in events(responses, "image")}
    assert [last[0].branch, last[1].branch] == [unspecified, unspecified]


@pytest.mark.parametrize("scheduler", SAMPLERS, ids=lambda s: pb.Scheduler.Name(s))
def test_compare_equals_the_two_requests_it_replaces(stub: pb_grpc.GenerationServiceStub, scheduler: int) -> None:
    common: dict[str, Any] = {"number_results": 2, "seed": 900, "scheduler": scheduler}
    compared = collect(stub, request(**common, refiner=pb.Refiner(start_step=5, compare=True)))
    refined = events(collect(stub, request(**common, refiner=pb.Refiner(start_step=5))), "image")
    alone = events(collect(stub, request(**common)), "image")

    got_alone, got_refined = branch_images(compared, pb.BRANCH_BASE_ONLY), branch_images(compared, 0)
    assert pictures(got_alone) == pictures(alone)  # the request without a refiner
    assert pictures(got_refined) == pictures(refined)  # the same request without compare
    assert [(i.base_steps, i.refiner_steps) for i in got_alone] == [(i.base_steps, i.refiner_steps) for i in alone]
    assert all(rgb(a) != rgb(r) for a, r in zip(got_alone, got_refined, strict=True)), "the refiner changed nothing"


# ---- the refiner's controls reach diffusers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def by_hand(model_store: ModelStore) -> _ByHand:
    return _ByHand(model_store)


def test_aesthetic_scores_reach_the_refiner_as_diffusers_defines_them(
    stub: pb_grpc.GenerationServiceStub, by_hand: _ByHand
) -> None:
    prompt = "a red bicycle leaning on a wall"
    common: dict[str, Any] = {"positive_prompt": prompt, "steps": 6, "seed": 77, "cfg_scale": 7.0}
    scored = pb.Refiner(start_step=3, aesthetic_score=9.0, negative_aesthetic_score=1.0)
    (image,) = events(collect(stub, request(**common, refiner=scored)), "image")
    (default,) = events(collect(stub, request(**common, refiner=pb.Refiner(start_step=3))), "image")
    assert rgb(image) != rgb(default)
    expected = by_hand.generate(prompt, 6, 2, 77, pb.SCHEDULER_EULER, aesthetic_score=9.0, negative_aesthetic_score=1.0)
    assert rgb(image) == expected.convert("RGB").tobytes()
    explicit_defaults = pb.Refiner(start_step=3, aesthetic_score=6.0, negative_aesthetic_score=2.5)
    (same,) = events(collect(stub, request(**common, refiner=explicit_defaults)), "image")
    assert rgb(same) == rgb(default)  # unset means diffusers' defaults


def test_refiner_prompts_reach_the_refiner(stub: pb_grpc.GenerationServiceStub, by_hand: _ByHand) -> None:
    prompt, refiner_prompt, refiner_negative = "a quiet harbour", "a watercolour painting", "a photograph"
    common: dict[str, Any] = {"positive_prompt": prompt, "steps": 6, "seed": 5, "cfg_scale": 7.0}
    own = pb.Refiner(start_step=3, positive_prompt=refiner_prompt, negative_prompt=refiner_negative)
    (image,) = events(collect(stub, request(**common, refiner=own)), "image")
    expected = by_hand.generate(
        prompt, 6, 2, 5, pb.SCHEDULER_EULER, prompt=refiner_prompt, negative_prompt=refiner_negative
    )
    assert rgb(image) == expected.convert("RGB").tobytes()
    # Only a negative of its own: the refiner keeps the request's prompt.
    negative_only = pb.Refiner(start_step=3, negative_prompt=refiner_negative)
    (image,) = events(collect(stub, request(**common, refiner=negative_only)), "image")
    expected = by_hand.generate(prompt, 6, 2, 5, pb.SCHEDULER_EULER, negative_prompt=refiner_negative)
    assert rgb(image) == expected.convert("RGB").tobytes()


# ---- batching ----------------------------------------------------------------------------------------------


@dataclass
class _GatedRunner:
    """The real runner, recording what each batch held; a request with the prompt HOLD keeps the device until
    the test lets it go, so that the requests sent meanwhile queue up and run as one batch."""

    HOLD = "hold the device"
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)
    batches: list[tuple[bool, list[int]]] = field(default_factory=list)

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult:
        if samples[0].prompt == self.HOLD:
            self.holding.set()
            assert self.release.wait(TIMEOUT_S)
        else:
            self.batches.append((shape.compare, [s.seed for s in samples]))
        return runner.run(pair, shape, samples, observer)


@pytest.fixture(scope="module")
def gated(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[tuple[ServerThread, _GatedRunner]]:
    gate = _GatedRunner()
    thread = ServerThread(make_settings(store_settings, max_batch=4), store=model_store, run=gate)
    try:
        thread.wait_ready()
        yield thread, gate
    finally:
        gate.release.set()
        thread.close()


def _queued_together(
    thread: ServerThread, gate: _GatedRunner, requests: list[pb.GenerateRequest]
) -> list[list[pb.GenerateResponse]]:
    """Send `requests` in this order while the device is held, each once admitted and resolved, then let the
    device go: the scheduler takes them (in queue order) into as few batches as its rules allow."""
    gate.batches.clear()
    gate.release.clear()
    gate.holding.clear()
    with grpc.insecure_channel(thread.address) as channel, ThreadPoolExecutor(len(requests) + 1) as pool:
        stub = new_stub(channel)
        hold = pool.submit(collect, stub, request(positive_prompt=_GatedRunner.HOLD, steps=2))
        assert gate.holding.wait(TIMEOUT_S)
        futures: list[Future[list[pb.GenerateResponse]]] = []
        for number, message in enumerate(requests, start=1):
            futures.append(pool.submit(collect, stub, message))
            _wait_until(lambda n=number: _resolved(thread.server.scheduler.queue.snapshot()) == n)
        gate.release.set()
        hold.result(TIMEOUT_S)
        return [f.result(TIMEOUT_S) for f in futures]


def _resolved(waiting: list[Ticket]) -> int:
    return sum(1 for ticket in waiting if ticket.spec is not None)


def _wait_until(condition: Any) -> None:
    done = threading.Event()
    for _ in range(int(TIMEOUT_S / 0.01)):
        if condition():
            return
        done.wait(0.01)
    pytest.fail("the requests never queued up")


@pytest.mark.parametrize("scheduler", [pb.SCHEDULER_EULER_ANCESTRAL, pb.SCHEDULER_DPMPP_2M], ids=pb.Scheduler.Name)
def test_compare_requests_batch_together_and_stay_exact(
    gated: tuple[ServerThread, _GatedRunner], scheduler: int
) -> None:
    thread, gate = gated

    def pair_of(refiner: pb.Refiner | None) -> list[pb.GenerateRequest]:
        common: dict[str, Any] = {"scheduler": scheduler, "refiner": refiner}
        return [
            request(positive_prompt="a red fox in snow", seed=11, **common),
            request(positive_prompt="a bowl of ramen", seed=21, number_results=2, **common),
        ]

    compared = _queued_together(thread, gate, pair_of(pb.Refiner(start_step=5, compare=True)))
    assert gate.batches == [(True, [11, 21, 22])]
    # The requests it replaces, batched the same way (the same images in the same batch: no float rounding
    # between batch sizes can excuse a difference).
    refined = _queued_together(thread, gate, pair_of(pb.Refiner(start_step=5)))
    assert gate.batches == [(False, [11, 21, 22])]
    alone = _queued_together(thread, gate, pair_of(None))
    assert gate.batches == [(False, [11, 21, 22])]
    for got, want_refined, want_alone in zip(compared, refined, alone, strict=True):
        assert pictures(branch_images(got, pb.BRANCH_BASE_ONLY)) == pictures(events(want_alone, "image"))
        assert pictures(branch_images(got, pb.BRANCH_UNSPECIFIED)) == pictures(events(want_refined, "image"))


def test_compare_and_plain_requests_run_in_separate_batches(gated: tuple[ServerThread, _GatedRunner]) -> None:
    thread, gate = gated
    compared, plain = _queued_together(
        thread,
        gate,
        [
            request(seed=11, refiner=pb.Refiner(start_step=5, compare=True)),
            request(seed=21, refiner=pb.Refiner(start_step=5)),
        ],
    )
    assert gate.batches == [(True, [11]), (False, [21])]
    assert len(events(compared, "image")) == 2 and len(events(plain, "image")) == 1
    assert len(events(plain, "progress")) == 6  # the plain request never waits on base-only steps


def test_refiner_controls_batch_only_where_the_result_stays_exact(gated: tuple[ServerThread, _GatedRunner]) -> None:
    thread, gate = gated
    scored = pb.Refiner(start_step=3, aesthetic_score=9.0)
    own_prompt = pb.Refiner(start_step=3, aesthetic_score=9.0, positive_prompt="a watercolour painting")
    other_score = pb.Refiner(start_step=3, aesthetic_score=3.0)
    messages = [
        request(seed=11, refiner=scored),
        request(seed=21, refiner=own_prompt),
        request(seed=31, refiner=other_score),
    ]
    batched = _queued_together(thread, gate, messages)
    # Refiner prompts are per image; aesthetic scores are one set of time ids per batch.
    assert gate.batches == [(False, [11, 21]), (False, [31])]
    with grpc.insecure_channel(thread.address) as channel:
        stub = new_stub(channel)
        solo = [events(collect(stub, m), "image")[0] for m in messages]
        (without_own_prompt,) = events(collect(stub, request(seed=21, refiner=scored)), "image")
    for responses, alone in zip(batched, solo, strict=True):
        got, want = levels(events(responses, "image")[0]), levels(alone)
        # Denoised beside another image, a result may differ from its solo run by float rounding (kernels sum
        # in another order for another batch size): a level here and there, never more.
        assert numpy.abs(got - want).max() <= 2 and (got != want).mean() < 0.01
    # ... which is far less than what the refiner's own prompt changes.
    assert (levels(events(batched[1], "image")[0]) != levels(without_own_prompt)).mean() > 0.05


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_default_refiner(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    thread = ServerThread(make_settings(store_settings, default_refiner=None, pins=()), store=model_store)
    try:
        yield thread
    finally:
        thread.close()


def _refused_fields(stub: pb_grpc.GenerationServiceStub, message: pb.GenerateRequest) -> list[str]:
    call = stub.Generate(message, timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as caught:
        received = list(call)
        pytest.fail(f"expected INVALID_ARGUMENT, got {len(received)} messages")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    return bad_request_fields(caught.value)


def test_compare_without_a_refiner_is_refused_naming_the_field(no_default_refiner: ServerThread) -> None:
    with grpc.insecure_channel(no_default_refiner.address) as channel:
        fields = _refused_fields(new_stub(channel), request(refiner=pb.Refiner(compare=True)))
    assert fields == ["refiner.model", "refiner.compare"]


@pytest.mark.parametrize(
    ("refiner", "expected"),
    [
        (pb.Refiner(aesthetic_score=float("nan")), ["refiner.aesthetic_score"]),
        (pb.Refiner(aesthetic_score=float("inf")), ["refiner.aesthetic_score"]),
        (pb.Refiner(aesthetic_score=10.5), ["refiner.aesthetic_score"]),
        (pb.Refiner(negative_aesthetic_score=-0.5), ["refiner.negative_aesthetic_score"]),
        (pb.Refiner(positive_prompt="x" * 4001), ["refiner.positive_prompt"]),
        (pb.Refiner(positive_prompt="  "), ["refiner.positive_prompt"]),
        (pb.Refiner(negative_prompt="x" * 4001), ["refiner.negative_prompt"]),
        (
            pb.Refiner(
                compare=True,
                start_step=99,
                aesthetic_score=float("-inf"),
                negative_aesthetic_score=11,
                positive_prompt="y" * 5000,
                negative_prompt="z" * 5000,
            ),
            [
                "refiner.start_step",
                "refiner.aesthetic_score",
                "refiner.negative_aesthetic_score",
                "refiner.positive_prompt",
                "refiner.negative_prompt",
            ],
        ),
    ],
)
def test_bad_refiner_controls_are_refused_before_any_work(
    stub: pb_grpc.GenerationServiceStub, refiner: pb.Refiner, expected: list[str]
) -> None:
    assert _refused_fields(stub, request(refiner=refiner)) == expected
