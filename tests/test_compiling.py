"""Compiled UNets on the tiny base, with real Dynamo tracing and a graph compiler that waits for the test
(tests/integration/test_speed.py runs Inductor itself): requests run eagerly while a shape compiles, the
compiled graph's first run waits until the device is free, the switch happens at the next step, unseen sizes
are compiled on demand within a bound, and an evicted UNet is freed."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modelstore import ModelStore, Role, load_pipeline
from server.core.domain import Sample, Stage
from server.generation import prompts
from server.generation.compiling import Compiler, CompileState, UNetDispatch
from server.generation.tuning import Tuning, tune_pipeline
from tests.conftest import TINY_BASE
from tests.fixtures.variants import write_variant_base

WAIT_S = 300  # a hang fails the test; never an expectation about speed


class GatedGraphCompiler:
    """Compiles nothing: the traced graph runs as it is (so images must equal the eager ones), once `release`
    is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.traced = threading.Event()
        self.graphs = 0

    def __call__(self, graph: Any, example_inputs: list[Any], mode: str) -> Callable[..., Any]:
        self.graphs += 1
        self.traced.set()
        assert self.release.wait(WAIT_S)
        return graph.forward  # type: ignore[no-any-return]


@pytest.fixture
def gate() -> Iterator[GatedGraphCompiler]:
    gated = GatedGraphCompiler()
    yield gated
    gated.release.set()


@dataclass
class Loaded:
    """The tiny base with its compiler; a test may drop `pipe` (pytest keeps the fixture's value alive)."""

    pipe: Any
    compiler: Compiler


@pytest.fixture
def compiled(model_store: ModelStore, gate: GatedGraphCompiler) -> Iterator[Loaded]:
    loaded = Loaded(
        load_pipeline(model_store.resolve(TINY_BASE), role=Role.BASE, device="cpu"),
        Compiler("cpu", "default", max_images=2, max_sizes=1, compile_graph=gate),
    )
    tune_pipeline(
        loaded.pipe, Tuning("default", fuse_qkv=True), compiler=loaded.compiler, model=TINY_BASE, role=Role.BASE
    )
    yield loaded
    gate.release.set()
    loaded.compiler.close(WAIT_S)


def _generate(pipe: Any, size: int = 64, images: int = 1) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(5 + i) for i in range(images)]
    out = pipe(
        prompt=["a lighthouse"] * images,
        width=size,
        height=size,
        num_inference_steps=3,
        generator=generators,
        output_type="np",
    )
    return np.asarray(out.images)


def _dispatch(pipe: Any) -> UNetDispatch:
    dispatch = pipe.unet.forward
    assert isinstance(dispatch, UNetDispatch)
    return dispatch


def test_eager_while_compiling_then_compiled_from_the_next_call(compiled: Loaded, gate: GatedGraphCompiler) -> None:
    pipe, compiler = compiled.pipe, compiled.compiler
    dispatch = _dispatch(pipe)
    eager_images, eager_one = _generate(pipe, images=2), _generate(pipe, images=1)
    compiler.request_size(pipe.unet, 64, 64)
    assert gate.traced.wait(WAIT_S)
    (shape,) = compiler.snapshot()[0]
    assert (shape.width, shape.height, shape.state, shape.pinned) == (64, 64, CompileState.COMPILING, True)

    # The request is served at once, eagerly, while its shape compiles.
    assert np.array_equal(_generate(pipe, images=2), eager_images)
    assert dispatch.calls == {"compiled": 0, "eager": 9}

    # The first run of the compiled graph waits while the device is in use.
    with compiler.device_lock:
        gate.release.set()
        assert not compiler.wait_idle(1.0)
        assert compiler.snapshot()[0][0].state is CompileState.COMPILING
    assert compiler.wait_idle(WAIT_S)
    assert compiler.snapshot()[0][0].state is CompileState.READY

    # One graph for every batch up to max_images (two latents per image with guidance); the same images.
    assert np.array_equal(_generate(pipe, images=2), eager_images)
    assert np.array_equal(_generate(pipe, images=1), eager_one)
    assert dispatch.calls == {"compiled": 6, "eager": 9} and gate.graphs == 1


def test_unseen_sizes_compile_on_demand_within_the_bound(compiled: Loaded, gate: GatedGraphCompiler) -> None:
    pipe, compiler = compiled.pipe, compiled.compiler
    _generate(pipe, size=80)  # unseen: eager, and queued (held until the call ends, so all three steps are eager)
    gate.release.set()
    assert compiler.wait_idle(WAIT_S)
    _generate(pipe, size=96)  # beyond --compile-sizes (1 here): stays eager, never queued
    assert compiler.wait_idle(WAIT_S)
    shapes = {(s.width, s.state, s.pinned) for s in compiler.snapshot()[0]}
    assert shapes == {(80, CompileState.READY, False)}
    _generate(pipe, size=80)
    assert compiler.snapshot()[1] == {"compiled": 3, "eager": 6}


def test_an_evicted_unet_is_freed_and_another_base_reuses_the_graph_with_its_own_weights(
    compiled: Loaded, gate: GatedGraphCompiler, model_store: ModelStore, tmp_path: Path
) -> None:
    pipe, compiler = compiled.pipe, compiled.compiler
    compiled.pipe = None
    gate.release.set()
    compiler.request_size(pipe.unet, 64, 64)
    assert compiler.wait_idle(WAIT_S)
    _generate(pipe)
    unet = weakref.ref(pipe.unet)
    del pipe
    gc.collect()
    assert unet() is None
    assert compiler.snapshot() == ((), {"compiled": 0, "eager": 0})

    # Another fine-tune of the same architecture: the traced graph takes the weights as inputs, so it serves
    # this UNet too (nothing is traced again) and gives this model's own images.
    folder = write_variant_base(model_store.resolve(TINY_BASE).path, tmp_path / "variant")
    record = model_store.resolve(f"local:{folder}")
    reference = load_pipeline(record, role=Role.BASE, device="cpu")
    tune_pipeline(reference, Tuning(None, fuse_qkv=True), compiler=None, model="variant", role=Role.BASE)
    other = load_pipeline(record, role=Role.BASE, device="cpu")
    tune_pipeline(other, Tuning("default", fuse_qkv=True), compiler=compiler, model="variant", role=Role.BASE)
    compiler.request_size(other.unet, 64, 64)
    assert compiler.wait_idle(WAIT_S)
    assert np.array_equal(_generate(other), _generate(reference))
    assert compiler.snapshot()[1] == {"compiled": 3, "eager": 0} and gate.graphs == 1


def test_a_long_prompt_is_a_shape_of_its_own_compiled_on_demand(compiled: Loaded, gate: GatedGraphCompiler) -> None:
    pipe, compiler = compiled.pipe, compiled.compiler
    dispatch = _dispatch(pipe)
    gate.release.set()
    compiler.request_size(pipe.unet, 64, 64)
    assert compiler.wait_idle(WAIT_S)
    # Two 75-token windows: a text sequence of 154, which the pinned shape's graph (77) does not take.
    conditioning = prompts.encode(pipe, [Sample("a lighthouse " * 60, None, 5)], Stage.BASE, "cpu", True)
    assert conditioning.tensors["prompt_embeds"].shape[1] == 154

    def run() -> np.ndarray:
        out = pipe(
            **conditioning.tensors,
            width=64,
            height=64,
            num_inference_steps=3,
            generator=torch.Generator("cpu").manual_seed(5),
            output_type="np",
        )
        return np.asarray(out.images)

    gate.release.clear()  # the long prompt's graph waits for the test: every step of the first run is eager
    eager = run()  # served at once, eagerly; the shape is queued
    assert dispatch.calls == {"compiled": 0, "eager": 3}
    gate.release.set()
    assert compiler.wait_idle(WAIT_S)
    assert {(s.tokens, s.state, s.pinned) for s in compiler.snapshot()[0]} == {
        (77, CompileState.READY, True),
        (154, CompileState.READY, False),
    }
    assert np.array_equal(run(), eager)
    assert dispatch.calls == {"compiled": 3, "eager": 3} and gate.graphs == 2
