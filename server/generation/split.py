"""Where the refiner takes over, in whole steps.

The contract (Runware-compatible) counts steps, not noise: with `steps = N`,

- `start_step = s` (2 <= s <= N): the base runs steps 1..s-1 and the refiner s..N;
- `start_step_percentage = p` (1 <= p <= 99): the base runs clamp(floor(N * p / 100 + 0.5), 1, N - 1);
- neither: 90 %.

diffusers' own `denoising_end` is a fraction of the noise axis, which gives other counts on Karras grids (16/9
instead of 20/5 at 25 steps, shared/research/diffusers.md §1.4); `server/generation/runner.py` therefore cuts the
schedule by index, and this module only does the arithmetic.
"""

from __future__ import annotations

from server.core.domain import DEFAULT_REFINER_START, RefinerStart, StartPercentage, StartStep

MIN_REFINER_TOTAL_STEPS = 2


def base_step_count(steps: int, start: RefinerStart | None) -> int:
    """Steps the base runs out of `steps` when a refiner takes over at `start` (None: the default, 90 %).

    The caller validates ranges first (server/api/validation.py reports them as field violations); this raises
    ValueError on anything outside them so a bug cannot silently produce a wrong split.
    """
    if steps < MIN_REFINER_TOTAL_STEPS:
        raise ValueError(f"a refiner needs at least {MIN_REFINER_TOTAL_STEPS} steps, got {steps}")
    start = DEFAULT_REFINER_START if start is None else start
    if isinstance(start, StartStep):
        if not 2 <= start.step <= steps:
            raise ValueError(f"start_step must be in 2..{steps}, got {start.step}")
        return start.step - 1
    if not 1 <= start.percent <= 99:
        raise ValueError(f"start_step_percentage must be in 1..99, got {start.percent}")
    # floor(steps * p / 100 + 0.5) in integers: no float rounding surprises at .5 boundaries.
    rounded = (2 * steps * start.percent + 100) // 200
    return min(max(rounded, 1), steps - 1)


__all__ = ["MIN_REFINER_TOTAL_STEPS", "StartPercentage", "StartStep", "base_step_count"]
