"""The GPU benchmark's figures as they are measured: every section time-boxed, the JSON rewritten after each
one (to $OUT and benchmarks/results/, or only to `folder`), so a run cut short still leaves what it measured;
per-image figures also as multiples of the arithmetic floor."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._service import log

RESULTS = Path(__file__).resolve().parent / "results"
# 419 TFLOP per 1024x1024 image with 30 steps (27 base + 3 refiner, guidance doubling each UNet batch, plus the
# VAE decode), counted on the real SDXL configs; at the H200's dense fp16 peak of 989.5 TFLOP/s (issue 12).
FLOOR_S = 0.42


class Report:
    def __init__(self, name: str, *, budget_s: float, floor_s: float | None, folder: Path | None = None) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.floor_s = floor_s
        self.figures: dict[str, Any] = {"sections": {}}
        self.paths = [(folder or RESULTS) / f"{name}.json"]
        if os.environ.get("OUT") and folder is None:
            self.paths.append(Path(os.environ["OUT"]) / f"{name}.json")

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def put(self, **figures: Any) -> None:
        for key, value in figures.items():
            self.figures[key] = value
            if key.endswith("per_image_s") and self.floor_s and isinstance(value, float):
                self.figures[key.removesuffix("_s") + "_x_floor"] = round(value / self.floor_s, 2)
        self.write()

    @contextlib.contextmanager
    def section(self, name: str, *, needs_s: float) -> Iterator[bool]:
        """Yields whether to run: False (and recorded as skipped) when less than `needs_s` is left. A failure is
        recorded and the run goes on with the next section."""
        record: dict[str, Any] = {}
        self.figures["sections"][name] = record
        if self.left_s() < needs_s:
            record["skipped"] = f"{self.left_s():.0f}s left, needs {needs_s:.0f}s"
            log(f"--- {name}: skipped ({record['skipped']})")
            self.write()
            yield False
            return
        log(f"--- {name} ({self.left_s():.0f}s left)")
        started = time.monotonic()
        try:
            yield True
            record["ok"] = True
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"{name} failed:\n{traceback.format_exc()}")
        finally:
            record["seconds"] = round(time.monotonic() - started, 1)
            self.write()

    def failed(self) -> list[str]:
        """The sections that raised."""
        return [name for name, record in self.figures["sections"].items() if "error" in record]

    def write(self) -> None:
        self.figures["elapsed_s"] = round(time.monotonic() - self.started, 1)
        text = json.dumps(self.figures, indent=2, default=str)
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
