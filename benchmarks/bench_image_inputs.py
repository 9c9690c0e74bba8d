"""What starting from an image costs (issue 18), through a real Refinery server on loopback gRPC in this process,
on the CPU with the tiny built-in models.

    python benchmarks/bench_image_inputs.py            # 128x128, 30 steps, strength 0.5, 20 interleaved rounds
    python benchmarks/bench_image_inputs.py --reps 20
    python benchmarks/bench_image_inputs.py --quick    # 64x64, 4 steps, one round: a check that it runs

Every figure from the same run:

a. img2img at strength 0.5 against text-to-image with the same N steps: half the grid runs (floor(N x 0.5)
   steps), so the goal is <= 0.6x the time; without and with the refiner (from 90 % of the same grid). At 64x64
   (the tiny models' native size) a step costs about as much as what every request pays once (text encoders,
   VAE, PNG, gRPC), which would hide the steps saved; at 128x128 with 30 steps the steps are most of a request,
   as they are for SDXL at 1024x1024 on a GPU (the server's own stage timings, printed, say how much).
b. inpainting against img2img of the same shape and strength (a mask repainting the centre quarter), without
   and with the refiner, and on the 9-channel tiny inpainting base (`--inpaint-model`).
c. an upload of a 1024x1024 noise PNG (3.1 MB: noise does not compress) through UploadImage in 64 KiB
   messages, as the clients send it, against the same bytes in one message to a second server whose request
   limit (`Settings.max_request_bytes`, 128 KiB by default, which also bounds one upload message) was raised for
   this alone; new bytes each round, so every upload is stored and fsynced: MB/s and the ratio.

The requests of a and b are interleaved round by round after a warm-up, so drift in machine load hits every
side alike; the input image and mask are uploaded once and named by reference. Every image is checked: the
same request gives the same pixels every time, the steps it reports are floor(N x strength) (N for text),
inpainting keeps the input pixel for pixel outside the mask, and the three modes give different images.
The figures are written to benchmarks/results/image_inputs_cpu.json (not with --quick).
`benchmarks/gpu_sdxl.py --only images` measures a and b with full-size SDXL on a GPU (`_image_inputs.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _image_inputs
from benchmarks._quick import parse_args
from benchmarks._report import RESULTS
from benchmarks._service import log
from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.app import RefineryServer
from server.core.logs import quiet_model_libraries
from server.core.settings import DEFAULT_PAIR, ImageSettings, Settings

INPAINT_MODEL = "builtin:tiny-sdxl-inpaint@1"


class StageLog(logging.Handler):
    """The server's per-request line (server/scheduling/ticket.py) as it is logged: its stage timings."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.found: list[dict[str, float]] = []
        self._lock_found = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        timings = getattr(record, "timings", None)
        if isinstance(timings, dict):
            with self._lock_found:
                self.found.append(dict(timings))

    def take(self) -> list[dict[str, float]]:
        with self._lock_found:
            found, self.found = self.found, []
        return found


class Served:
    """A RefineryServer on 127.0.0.1 on its own event loop in a thread (as tests/integration runs it), and a
    client channel to it; `timings()` are the server's own, of the requests that ended since the last call."""

    def __init__(self, settings: Settings, store: ModelStore) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = RefineryServer(settings, store=store)
        self._run(self.server.start())
        self._run(self.server.wait_ready())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.GenerationServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.stages = StageLog()
        ticket_log = logging.getLogger("server.scheduling.ticket")
        ticket_log.setLevel(logging.INFO)
        ticket_log.addHandler(self.stages)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    def timings(self) -> list[dict[str, float]]:
        return self.stages.take()

    def close(self) -> None:
        logging.getLogger("server.scheduling.ticket").removeHandler(self.stages)
        self.channel.close()
        self._run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)


def settings_in(folder: Path, store: ModelStore, **overrides: Any) -> Settings:
    settings = Settings(
        store=store.settings, host="127.0.0.1", port=0, devices=("cpu",),
        pins=(DEFAULT_PAIR,), drain_delay_s=0.0, images=ImageSettings(directory=folder / "images"),
    )  # fmt: skip
    return replace(settings, **overrides)


def measure(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    store = ModelStore(StoreSettings(cache_dir=workdir / "models", offline=True))
    figures: dict[str, Any] = {}
    log(f"a, b: text, img2img and inpainting at {args.size}x{args.size}, {args.steps} steps, interleaved")
    served = Served(settings_in(workdir / "generate", store), store)
    try:
        figures["modes"] = _image_inputs.modes(served, args)
    finally:
        served.close()
    log(f"c: uploading a {args.upload_side}x{args.upload_side} PNG")
    # Two servers alike but for the request limit (one upload message); nothing pinned: they only store.
    chunked = Served(settings_in(workdir / "chunked", store, pins=()), store)
    limit = ImageSettings().max_bytes + (1 << 20)  # the largest image the store takes, and its message's framing
    whole = Served(settings_in(workdir / "whole", store, pins=(), max_request_bytes=limit), store)
    try:
        figures["upload"] = _image_inputs.uploads(chunked.stub, whole.stub, args)
    finally:
        chunked.close()
        whole.close()
    return figures


def report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{args.size}x{args.size}, {args.steps} steps, strength {args.strength}, refiner from 90 %, Euler, cfg 7; "
        f"CPU, tiny models; {args.reps} interleaved rounds after {args.warmup} warm-up round(s)"
    )
    print(
        f"{'':<18} {'median ms':>9} {'min ms':>9} {'steps run':>10} {'base ms':>8} {'refiner ms':>10} {'decode ms':>9}"
    )
    for name, row in figures["modes"]["requests"].items():
        stages = row["server_stages_s"]
        ran = "+".join(str(n) for n in row["steps_run"])
        print(
            f"{name:<18} {row['median_s'] * 1000:>9.1f} {row['min_s'] * 1000:>9.1f} {ran:>10} "
            f"{stages.get('base_s', 0) * 1000:>8.1f} {stages.get('refiner_s', 0) * 1000:>10.1f} "
            f"{stages.get('decode_s', 0) * 1000:>9.1f}"
        )
    for pair, ratio in figures["modes"]["ratios"].items():
        goal = "  (goal <= 0.6)" if pair.startswith("img2img") else ""
        print(f"  {pair:<34} {ratio:.3f}{goal}")
    up = figures["upload"]
    print(f"\nUploadImage of a {up['side']}x{up['side']} noise PNG, {up['png_bytes'] / 1e6:.2f} MB:")
    for name in ("chunks_64k", "one_message"):
        row = up[name]
        print(f"  {name:<16} {row['median_s'] * 1000:>8.1f} ms (min {row['min_s'] * 1000:.1f})  {row['mb_per_s']} MB/s")
    print(f"  ratio 64 KiB messages / one message: {up['ratio_chunks_to_one_message']:.3f}")
    problems = figures["modes"]["problems"]
    print("checks: " + ("every image as expected" if not problems else "PROBLEMS:\n  " + "\n  ".join(problems)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="interleaved rounds of each comparison (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--upload-side", type=int, default=1024, help="the uploaded PNG's side (default 1024)")
    parser.add_argument("--inpaint-model", default=INPAINT_MODEL, help="a 9-channel inpainting base ('': none)")
    parser.add_argument("--json", type=Path, default=RESULTS / "image_inputs_cpu.json", help="where the figures go")
    args = parse_args(parser, {"reps": 1, "warmup": 0, "steps": 4, "size": 64, "upload_side": 256})
    quiet_model_libraries()
    with tempfile.TemporaryDirectory(prefix="refinery-bench-images-") as tmp:
        figures = measure(Path(tmp), args)
    report(figures, args)
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))
        print(f"figures written to {args.json}")
    if figures["modes"]["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
