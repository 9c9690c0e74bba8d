"""The CLI's view of a `Generate` stream: queue position, model loading, and a per-stage progress bar.

On a terminal the bar redraws in place; otherwise (pipes, CI logs) it prints one line per finished stage so
logs stay short.
"""

from __future__ import annotations

import sys
from typing import TextIO

from refinery.v1 import generation_pb2 as pb

_STAGE_NAMES = {pb.STAGE_BASE: "base", pb.STAGE_REFINER: "refiner"}
_ROLE_NAMES = {pb.MODEL_ROLE_BASE: "base", pb.MODEL_ROLE_REFINER: "refiner"}
_BAR_WIDTH = 30


class ProgressView:
    def __init__(self, stream: TextIO | None = None, *, interactive: bool | None = None) -> None:
        self._out = stream if stream is not None else sys.stderr
        self._interactive = self._out.isatty() if interactive is None else interactive
        self._open_line = False  # a bar is drawn on the current line (interactive only)

    def show(self, response: pb.GenerateResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "queued":
            q = response.queued
            ahead = "runs next" if q.position == 0 else f"{q.position} ahead"
            self._line(f"queued: {ahead} ({q.queue_depth} waiting)")
        elif kind == "model_loading":
            self._loading(response.model_loading)
        elif kind == "progress":
            self._progress(response.progress)

    def close(self) -> None:
        if self._open_line:
            self._out.write("\n")
            self._open_line = False
        self._out.flush()

    def _loading(self, event: pb.ModelLoading) -> None:
        role = _ROLE_NAMES.get(event.role, "model")
        if event.phase in (pb.ModelLoading.PHASE_DOWNLOADING, pb.ModelLoading.PHASE_VERIFYING):
            total = f" of {event.bytes_total / 1e6:.1f} MB" if event.bytes_total else ""
            doing = "downloading" if event.phase == pb.ModelLoading.PHASE_DOWNLOADING else "verifying"
            text = f"{doing} {role} {event.model}: {event.bytes_done / 1e6:.1f} MB{total}"
            if self._interactive:  # byte counts would flood a log; the LOADING line follows anyway
                self._draw(text)
            return
        if event.phase == pb.ModelLoading.PHASE_LOADING:
            self._line(f"loading {role} {event.model} ...")
        elif event.phase == pb.ModelLoading.PHASE_READY:
            self._line(f"loaded {role} {event.model}")

    def _progress(self, p: pb.Progress) -> None:
        stage = _STAGE_NAMES.get(p.stage, "step")
        elapsed = p.elapsed.ToTimedelta().total_seconds()
        filled = round(_BAR_WIDTH * p.step / max(p.stage_steps, 1))
        text = (
            f"{stage:<8}[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {p.step}/{p.stage_steps}"
            f"  step {p.overall_step}/{p.total_steps}  {elapsed:.1f}s"
        )
        if self._interactive:
            self._draw(text)
            if p.step == p.stage_steps:
                self.close()
        elif p.step == p.stage_steps:
            self._line(text)

    def _draw(self, text: str) -> None:
        self._out.write("\r\x1b[2K" + text)
        self._out.flush()
        self._open_line = True

    def _line(self, text: str) -> None:
        self.close()
        self._out.write(text + "\n")
        self._out.flush()
