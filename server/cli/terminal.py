"""What the CLI shows at a terminal, shared by every command: progress bars (tqdm), tables, byte counts and the
one-line error (and exit code) for a failed call.

On a terminal a bar redraws in place; elsewhere (pipes, CI logs) a view prints one line per finished stage or
download, so logs stay short.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping, Sequence
from typing import Any, TextIO

import grpc
from tqdm import tqdm

from modelstore.units import format_bytes
from refinery.client import (
    Branch,
    Event,
    ModelLoading,
    Phase,
    Progress,
    PullProgress,
    Queued,
    RefineryError,
    Role,
    Stage,
)
from server.cli.options import EXIT_FAILED, EXIT_USAGE

_BAR_WIDTH = 30


class _Bar(tqdm):  # type: ignore[type-arg]
    """A tqdm bar whose numbers are ours (`text`): the server's byte counts and rates, in our byte format."""

    text = ""

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        values = super().format_dict
        values["text"] = self.text
        return values


def _bar(desc: str, total: int, out: TextIO) -> _Bar:
    return _Bar(
        total=total,
        desc=desc,
        file=out,
        bar_format="{desc} [{bar:" + str(_BAR_WIDTH) + "}] {text}",
        ascii=".#",
        mininterval=0,
        leave=True,
    )


class _View:
    """One bar at a time on a terminal; `interactive=False` draws nothing (the subclass prints lines)."""

    def __init__(self, stream: TextIO | None, interactive: bool | None) -> None:
        self._out = stream if stream is not None else sys.stderr
        self._interactive = self._out.isatty() if interactive is None else interactive
        self._bar: _Bar | None = None

    def _draw(self, desc: str, done: int, total: int, text: str) -> None:
        total = max(total, 1)
        if self._bar is None or self._bar.desc != desc or self._bar.total != total:
            self._end_bar()
            self._bar = _bar(desc, total, self._out)
        self._bar.text = text
        self._bar.n = min(done, total)
        self._bar.refresh()

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, text: str) -> None:
        self._end_bar()
        self._out.write(text + "\n")
        self._out.flush()


class ProgressView(_View):
    """A `Generate` stream: queue position, model loading, a bar per stage."""

    def __init__(self, stream: TextIO | None = None, *, interactive: bool | None = None) -> None:
        super().__init__(stream, interactive)

    def show(self, event: Event) -> None:
        if isinstance(event, Queued):
            ahead = "runs next" if event.position == 0 else f"{event.position} ahead"
            self._line(f"queued: {ahead} ({event.queue_depth} in the queue, this one included)")
        elif isinstance(event, ModelLoading):
            self._loading(event)
        elif isinstance(event, Progress):
            self._progress(event)

    def close(self) -> None:
        self._end_bar()
        self._out.flush()

    def _loading(self, event: ModelLoading) -> None:
        role = event.role if event.role is not Role.UNSPECIFIED else "model"
        if event.phase in (Phase.DOWNLOADING, Phase.VERIFYING):
            total = f" / {format_bytes(event.bytes_total)}" if event.bytes_total else ""
            if self._interactive:  # byte counts would flood a log; the LOADING line follows anyway
                text = f"{format_bytes(event.bytes_done)}{total}"
                self._draw(f"{event.phase} {role} {event.model}", event.bytes_done, event.bytes_total, text)
            return
        if event.phase is Phase.LOADING:
            self._line(f"loading {role} {event.model} ...")
        elif event.phase is Phase.READY:
            self._line(f"loaded {role} {event.model}")

    def _progress(self, p: Progress) -> None:
        stage = (
            "base-only" if p.branch is Branch.BASE_ONLY else (p.stage if p.stage is not Stage.UNSPECIFIED else "step")
        )
        text = f"{p.step}/{p.stage_steps}  step {p.overall_step}/{p.total_steps}  {p.elapsed.total_seconds():.1f}s"
        if self._interactive:
            self._draw(f"{stage:<7}", p.step, p.stage_steps, text)
            if p.step == p.stage_steps:
                self._end_bar()
        elif p.step == p.stage_steps:
            filled = "#" * _BAR_WIDTH
            self._line(f"{stage:<7} [{filled}] {text}")


class PullView(_View):
    """Download progress of one pull (for a local model: hashing progress): nothing when the model was already
    cached; on a terminal a bar; elsewhere one line once done."""

    def __init__(self, model: str, stream: TextIO | None = None, *, interactive: bool | None = None) -> None:
        super().__init__(stream, interactive)
        self._model = model
        self._last: PullProgress | None = None

    @property
    def model(self) -> str:
        return self._model

    def show(self, progress: PullProgress) -> None:
        self._last = progress
        if not self._interactive:
            return
        done, total = progress.bytes_done, progress.bytes_total
        amount = f"{format_bytes(done)} / {format_bytes(total)}" if total else format_bytes(done)
        doing = "verifying " if progress.verifying else ""
        rate = format_bytes(int(progress.bytes_per_second))
        self._draw(f"{doing}{self._model}", done, total, f"{amount}  {rate}/s")

    def close(self, *, completed: bool) -> None:
        """End the bar; `completed`: the model is in the cache (else the error line follows)."""
        if self._last is None:
            return
        if self._interactive:
            self._end_bar()  # the bar stays, as far as it got
        last = self._last
        resumed = not last.verifying and last.bytes_transferred is not None and last.bytes_done > last.bytes_transferred
        if completed and (resumed or not self._interactive):  # on a terminal the bar says the rest
            self._out.write(f"{self._model}: {_summary(last)}\n")
        self._out.flush()
        self._last = None


def _summary(last: PullProgress) -> str:
    """What a finished pull did: the bytes it hashed, or those it downloaded, never counting as downloaded the
    bytes an interrupted attempt had left in the cache."""
    rate = format_bytes(int(last.bytes_per_second))
    if last.verifying:
        return f"{format_bytes(last.bytes_done)} verified ({rate}/s)"
    if last.bytes_transferred is None:  # a server that does not say
        return f"{format_bytes(last.bytes_done)} downloaded ({rate}/s)"
    kept = last.bytes_done - last.bytes_transferred
    already = f", {format_bytes(kept)} were already here" if kept > 0 else ""
    return f"{format_bytes(last.bytes_transferred)} downloaded{already} ({rate}/s)"


def print_table(rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)


def describe_error(err: RefineryError) -> str:
    """One line: the status code, and each field violation if the server named fields."""
    violations = "; ".join(f"{v.field}: {v.description}" for v in err.field_violations)
    return f"error: {err.code.name}: {violations or err.message}"


def report_failure(err: RefineryError) -> int:
    """The one-line error of a failed call on stderr; the exit code: usage (2) when the server called the
    request invalid (INVALID_ARGUMENT), else failed (1)."""
    print(describe_error(err), file=sys.stderr)
    return EXIT_USAGE if err.code is grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
