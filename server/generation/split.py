"""Where the refiner takes over, in whole steps.

The contract (Runware-compatible) counts steps, not noise: with `steps = N`,

- `start_step = s` (2 <= s <= N): the base runs steps 1..s-1 and the refiner s..N;
- `start_step_percentage = p` (1 <= p <= 99): the base runs clamp(floor(N * p / 100 + 0.5), 1, N - 1);
- neither: 90 %.

Starting from an image (img2img, inpainting), `strength = σ` runs the last `R = floor(N * σ)` steps of the same
N-step grid (σ read to 4 decimals, so float32's 0.7 gives 21 of 30, not 20); denoising starts at index
`N - R`. The refiner's start is computed on the full grid as above, independently of strength: the base runs
steps `N-R+1 .. s-1` and the refiner `max(s, N-R+1) .. N`. A start at or before the first step that runs
(`start_step = 1` is allowed with an image) means refine-only.

diffusers' own `denoising_end` is a fraction of the noise axis, which gives other counts on Karras grids (16/9
instead of 20/5 at 25 steps, shared/research/diffusers.md §1.4); `server/generation/runner.py` therefore cuts the
schedule by index, and this module only does the arithmetic.
"""

from __future__ import annotations

from server.core.domain import DEFAULT_REFINER_START, RefinerStart, StartPercentage, StartStep

MIN_REFINER_TOTAL_STEPS = 2


STRENGTH_SCALE = 10_000  # strength is read to 4 decimals


def base_step_count(steps: int, start: RefinerStart | None, *, from_image: bool = False) -> int:
    """Grid steps before the refiner takes over at `start` (None: the default, 90 %), out of `steps`. Without an
    image the base runs exactly these; with one, those of them at or after the start index.

    The caller validates ranges first (server/api/validation.py reports them as field violations); this raises
    ValueError on anything outside them so a bug cannot silently produce a wrong split.
    """
    if steps < MIN_REFINER_TOTAL_STEPS:
        raise ValueError(f"a refiner needs at least {MIN_REFINER_TOTAL_STEPS} steps, got {steps}")
    start = DEFAULT_REFINER_START if start is None else start
    if isinstance(start, StartStep):
        first = min_start_step(from_image)
        if not first <= start.step <= steps:
            raise ValueError(f"start_step must be in {first}..{steps}, got {start.step}")
        return start.step - 1
    if not 1 <= start.percent <= 99:
        raise ValueError(f"start_step_percentage must be in 1..99, got {start.percent}")
    # floor(steps * p / 100 + 0.5) in integers: no float rounding surprises at .5 boundaries.
    rounded = (2 * steps * start.percent + 100) // 200
    return min(max(rounded, 1), steps - 1)


def min_start_step(from_image: bool) -> int:
    """The lowest `start_step`: 1 (refine-only) when there is an image to start from, else 2."""
    return 1 if from_image else 2


def start_index(steps: int, strength: float) -> int:
    """The grid index img2img starts at: `steps - floor(steps * strength)`, strength read to 4 decimals.
    Raises ValueError when no step would run or strength is outside (0, 1]."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    runs = steps * round(strength * STRENGTH_SCALE) // STRENGTH_SCALE  # integers: no float rounding at the boundary
    if runs < 1:
        raise ValueError(f"steps x strength must be at least 1 step, got {steps} x {strength:g}")
    return steps - runs


__all__ = [
    "MIN_REFINER_TOTAL_STEPS",
    "StartPercentage",
    "StartStep",
    "base_step_count",
    "min_start_step",
    "start_index",
]
