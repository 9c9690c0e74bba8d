"""How long a request takes on a device here, learnt from the batches this server ran: to refuse at admission
a request whose deadline cannot be met, instead of running it for nobody.

What a run costs is learnt per *shape* (the models and how they run, the image size, the images per UNet call)
as a fixed part (prompt encoding, the decode) and a part per denoising step, measured apart: the time between
the first and the last step's report is steps only. A request whose own shape has run here is estimated from
that history at its own step count. One whose shape has not is estimated from the largest shapes of its kind
that ran, which cannot be slower than it (fewer pixels, no more images): a lower bound, so an unseen shape is
never refused on a guess. A single pace over every batch, as before, let cheap requests poison it: a 64², 1-step
request is nearly all fixed cost, and a 256², 12-step request that takes 1.1 s was refused as needing 3 s.

Refusals leave a margin (`MARGIN`): a request is refused only when the estimate exceeds the time it has left by
a fifth, so the noise of a measured pace does not turn a request that would have fit into a refusal.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from server.core.domain import Job
from server.core.errors import DeadlineExceeded, Overloaded

# Refuse only when the estimate exceeds the time left by this factor.
MARGIN = 1.2
# Shapes remembered (least recently seen forgotten first): a bound on memory whatever the traffic.
MAX_SHAPES = 512
# Weight of a new observation in a shape's running means.
_NEW = 0.3


@dataclass(frozen=True)
class Shape:
    """What a run's time depends on. `profile`: the models and how they run them (pair, compare, guidance on
    or off); requests of different profiles are never compared. `pixels`: width x height; `images`: images per
    UNet call; `steps`: denoising steps in all."""

    profile: Hashable
    pixels: int
    images: int
    steps: int

    @property
    def size(self) -> tuple[Hashable, int, int]:
        return (self.profile, self.pixels, self.images)


@dataclass
class _Cost:
    fixed: float  # seconds outside the steps
    per_step: float  # seconds a step; 0 until a run of 2 or more steps measured it

    def seconds(self, steps: int) -> float:
        return self.fixed + steps * self.per_step


# A request ahead of another: the seconds of device time it still needs (as estimated), and the seconds until its
# own deadline (None: it has none). It holds a device no longer than either.
Ahead = tuple[float, float | None]


class Pace:
    """Until a shape of a request's kind has run, nothing is known of it and nothing is refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._costs: OrderedDict[tuple[Hashable, int, int], _Cost] = OrderedDict()

    def observe(self, shape: Shape, seconds: float, step_seconds: float | None) -> None:
        """A run of `shape` took `seconds` from its first step's work to its images, its steps `step_seconds`
        each (None when it had one step, which tells steps and fixed cost apart no better than the total)."""
        if seconds <= 0 or shape.steps <= 0:
            return
        with self._lock:
            cost = self._costs.pop(shape.size, None)  # popped and put back: the most recently seen goes last
            known = cost.per_step if cost is not None else 0.0
            if step_seconds is not None:  # one step tells the step's cost apart from the rest no better than 0 does
                known = _mean(known, step_seconds) if known else step_seconds
            per_step = known
            fixed = max(0.0, seconds - shape.steps * per_step)
            self._costs[shape.size] = _Cost(fixed if cost is None else _mean(cost.fixed, fixed), per_step)
            while len(self._costs) > MAX_SHAPES:
                self._costs.popitem(last=False)

    def seconds_for(self, shape: Shape) -> float | None:
        """The device time a run of `shape` needs: from its own history, else the lower bound the runs of
        smaller shapes of its profile give; None when none has run."""
        with self._lock:
            own = self._costs.get(shape.size)
            if own is not None:
                return own.seconds(shape.steps)
            bounds = [
                cost.seconds(shape.steps)
                for (profile, pixels, images), cost in self._costs.items()
                if profile == shape.profile and pixels <= shape.pixels and images <= shape.images
            ]
        return max(bounds) if bounds else None

    def check(self, own: Shape, ahead: Iterable[Ahead], devices: int, remaining_s: float) -> None:
        """Refuse a request of shape `own` with the requests `ahead` of it (running, or queued before it),
        `remaining_s` before its deadline: DEADLINE_EXCEEDED when it alone, on an idle device, cannot finish in
        time (no retry helps), else RESOURCE_EXHAUSTED with a retry delay when those ahead of it make it late
        (later, or another replica, may do). Each only when the estimate exceeds the time left by `MARGIN`."""
        alone = self.seconds_for(own)
        if alone is None:
            return
        if alone > remaining_s * MARGIN:
            raise DeadlineExceeded(
                f"the request needs about {alone:.1f}s of a device here; its deadline leaves {remaining_s:.1f}s"
            )
        busy = sum(seconds if until is None else max(0.0, min(seconds, until)) for seconds, until in ahead)
        waiting = busy / max(devices, 1)
        if alone + waiting > remaining_s * MARGIN:
            raise Overloaded(
                f"the requests ahead of it need about {waiting:.1f}s; with this one's {alone:.1f}s its deadline "
                f"({remaining_s:.1f}s away) would pass",
                retry_after_s=max(1.0, round(waiting, 1)),
            )


def shape_of(job: Job, width: int, height: int, images: int | None = None) -> Shape:
    """The shape `job` runs in at `width` x `height`, in a batch of `images` images (its own results alone when
    None). Guidance of 1 or less skips the unconditional pass, which halves a step."""
    profile = (job.pair, job.compare, job.cfg_scale > 1)
    return Shape(profile, width * height, images or job.number_results, job.total_steps)


def _mean(old: float, new: float) -> float:
    return (1 - _NEW) * old + _NEW * new
