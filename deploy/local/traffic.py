"""Calls through the fleet, as a client in any language makes them: one streaming `Generate` per request with
the `refinery-pair` header, and what came back (status, images, whether the stream showed a model load).

The tests and `benchmarks/bench_fleet.py` drive the fleet with it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from refinery.client import DEFAULT_MAX_RECEIVE_BYTES, PAIR_HEADER, pair_affinity
from refinery.client.channel import channel_options
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc

# The client package's channel: a receive limit above the server's image chunks, keepalive for long streams.
CHANNEL_OPTIONS = channel_options(DEFAULT_MAX_RECEIVE_BYTES)
# A hang ends the call instead of the run; never an expectation about speed.
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Pair:
    """A base model and its refiner ("" for none), as a request names them."""

    model: str
    refiner: str = ""

    @property
    def key(self) -> str:
        return pair_affinity(self.model, self.refiner)

    def request(self, *, steps: int, size: int, seed: int) -> pb.GenerateRequest:
        request = pb.GenerateRequest(
            positive_prompt="a lighthouse on a cliff at dusk", model=self.model, steps=steps, seed=seed
        )
        request.width = request.height = size
        if self.refiner:
            request.refiner.model = self.refiner
        return request


@dataclass(frozen=True)
class Outcome:
    pair: Pair
    code: grpc.StatusCode
    details: str
    started: float  # time.monotonic()
    ended: float
    images: int
    loaded: bool  # the stream showed a model loading: the replica did not hold the pair yet

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def generation_stub(channel: grpc.Channel) -> pb_grpc.GenerationServiceStub:
    return pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]


def generate(
    stub: pb_grpc.GenerationServiceStub,
    pair: Pair,
    *,
    steps: int = 4,
    size: int = 64,
    seed: int = 1,
    running: threading.Event | None = None,
    header: bool = True,
) -> Outcome:
    """One call. `running` is set at the first denoising step: the request is then in flight on a device."""
    started = time.monotonic()
    images = 0
    loaded = False
    metadata = ((PAIR_HEADER, pair.key),) if header else ()
    try:
        for response in stub.Generate(
            pair.request(steps=steps, size=size, seed=seed), metadata=metadata, timeout=TIMEOUT_S
        ):
            event = response.WhichOneof("event")
            if event == "model_loading":
                loaded = True
            elif event == "progress" and running is not None:
                running.set()
            elif event == "image":
                images += 1
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    return Outcome(pair, code, details, started, time.monotonic(), images, loaded)


def mix(pairs: Sequence[Pair], count: int, seed: int) -> list[Pair]:
    """`count` pairs drawn uniformly at random, the same list for the same seed."""
    rng = random.Random(seed)
    return [rng.choice(pairs) for _ in range(count)]
