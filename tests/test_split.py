"""The split: how many steps each stage runs, as arithmetic and as the runner actually runs them."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import pytest
import torch

from modelstore import ModelStore
from modelstore.loading import load_pipeline
from server.core.domain import RenderShape, Sample, Sampler, Stage, StartPercentage, StartStep
from server.generation import runner
from server.generation.pipelines import PipelinePair
from server.generation.runner import StepState
from server.generation.split import base_step_count

TINY_BASE = "builtin:tiny-sdxl-base@1"
TINY_REFINER = "builtin:tiny-sdxl-refiner@1"


# ---- arithmetic --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "start", "base"),
    [
        (20, StartPercentage(90), 18),  # the contract's examples
        (30, StartPercentage(85), 26),
        (20, None, 18),  # neither set: 90 %
        (30, None, 27),
        (25, StartPercentage(80), 20),  # Karras grids split 16/9 by noise level; by steps it is 20/5
        (10, StartPercentage(25), 3),  # 2.5 rounds half up
        (10, StartPercentage(15), 2),  # 1.5 rounds half up
        (2, StartPercentage(1), 1),  # clamped to at least one base step
        (2, StartPercentage(99), 1),  # ... and at least one refiner step
        (150, StartPercentage(99), 149),
        (20, StartStep(2), 1),  # the refiner runs steps start..steps
        (20, StartStep(20), 19),
    ],
)
def test_examples(steps: int, start: StartStep | StartPercentage | None, base: int) -> None:
    assert base_step_count(steps, start) == base


@pytest.mark.parametrize("steps", range(2, 151))
def test_every_start_step(steps: int) -> None:
    for start in range(2, steps + 1):
        assert base_step_count(steps, StartStep(start)) == start - 1


@pytest.mark.parametrize("steps", range(2, 151))
def test_every_percentage(steps: int) -> None:
    for percent in range(1, 100):
        exact = Fraction(steps * percent, 100) + Fraction(1, 2)
        expected = min(max(exact.numerator // exact.denominator, 1), steps - 1)
        base = base_step_count(steps, StartPercentage(percent))
        assert base == expected
        assert 1 <= base <= steps - 1


@pytest.mark.parametrize(
    ("steps", "start"),
    [
        (1, None),
        (20, StartStep(1)),
        (20, StartStep(21)),
        (20, StartPercentage(0)),
        (20, StartPercentage(100)),
    ],
)
def test_out_of_range_is_refused(steps: int, start: StartStep | StartPercentage | None) -> None:
    with pytest.raises(ValueError):
        base_step_count(steps, start)


# ---- what the runner runs ----------------------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.steps: list[tuple[Stage, int, int, int]] = []

    def on_step(self, state: StepState) -> None:
        self.steps.append((state.stage, state.step, state.stage_steps, state.overall_step))


@pytest.fixture(scope="module")
def pair(model_store: ModelStore) -> Iterator[PipelinePair]:
    def load(model: str, role: str) -> object:
        return load_pipeline(model_store.resolve(model), role=role, device="cpu", dtype=torch.float32)

    # One thread: tiny models are all small operations, and OpenMP threads that spin-wait for a partner
    # descheduled on a busy machine make them many times slower (what server/device.py guards against).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield PipelinePair(load(TINY_BASE, "base"), load(TINY_REFINER, "refiner"))
    finally:
        torch.set_num_threads(threads)


def _run_counts(pair: PipelinePair, scheduler: Sampler, steps: int, base_steps: int) -> None:
    # cfg 1.0 skips classifier-free guidance: half the UNet work, the same schedule.
    shape = RenderShape(64, 64, steps, base_steps, 1.0, scheduler)
    counter = _Counter()
    result = runner.run(pair, shape, [Sample("a test", None, 1)], counter)
    refiner_steps = steps - base_steps
    assert counter.steps == [(Stage.BASE, i, base_steps, i) for i in range(1, base_steps + 1)] + [
        (Stage.REFINER, i, refiner_steps, base_steps + i) for i in range(1, refiner_steps + 1)
    ]
    assert len(result.images) == 1


@pytest.mark.parametrize("scheduler", list(Sampler), ids=lambda k: k.value)
@pytest.mark.parametrize("steps", [2, 3, 5])
def test_runner_runs_exact_counts_for_every_start(pair: PipelinePair, scheduler: Sampler, steps: int) -> None:
    for start in range(2, steps + 1):
        _run_counts(pair, scheduler, steps, base_step_count(steps, StartStep(start)))


@pytest.mark.parametrize("start", range(44, 51))
def test_dpmpp_2m_karras_50_steps_late_starts(pair: PipelinePair, start: int) -> None:
    # From 45 steps up, neighbouring Karras timesteps share an integer, so no noise-level cutoff can split
    # there; the runner splits by index and still gives exactly what was asked.
    _run_counts(pair, Sampler.DPMPP_2M_KARRAS, 50, base_step_count(50, StartStep(start)))


@pytest.mark.parametrize("scheduler", list(Sampler), ids=lambda k: k.value)
def test_default_split_at_25_steps(pair: PipelinePair, scheduler: Sampler) -> None:
    _run_counts(pair, scheduler, 25, base_step_count(25, None))


# ---- compare: one base run, two images -------------------------------------------------------------------


class _UNetCalls:
    """Counts forward calls of the pair's UNets (one per denoising step: guidance is off at cfg 1)."""

    def __init__(self, pair: PipelinePair) -> None:
        assert pair.refiner is not None
        self.calls = {"base": 0, "refiner": 0}
        self._hooks = [
            pair.base.unet.register_forward_hook(lambda *_: self._count("base")),
            pair.refiner.unet.register_forward_hook(lambda *_: self._count("refiner")),
        ]

    def _count(self, which: str) -> None:
        self.calls[which] += 1

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@pytest.mark.parametrize("scheduler", list(Sampler), ids=lambda k: k.value)
@pytest.mark.parametrize(("steps", "base_steps"), [(2, 1), (5, 3), (5, 4)])
def test_compare_runs_the_shared_steps_once(
    pair: PipelinePair, scheduler: Sampler, steps: int, base_steps: int
) -> None:
    shape = RenderShape(64, 64, steps, base_steps, 1.0, scheduler, compare=True)
    counter = _Counter()
    unets = _UNetCalls(pair)
    try:
        result = runner.run(pair, shape, [Sample("a test", None, 1), Sample("another", None, 2)], counter)
    finally:
        unets.remove()
    refiner_steps = steps - base_steps
    # The base: its shared steps, then on alone to the end; then the refiner from the hand-off.
    assert unets.calls == {"base": steps, "refiner": refiner_steps}
    assert counter.steps == (
        [(Stage.BASE, i, base_steps, i) for i in range(1, base_steps + 1)]
        + [(Stage.BASE, i, steps, i) for i in range(base_steps + 1, steps + 1)]
        + [(Stage.REFINER, i, refiner_steps, steps + i) for i in range(1, refiner_steps + 1)]
    )
    assert len(result.images) == len(result.base_only) == 2
