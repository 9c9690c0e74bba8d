"""Delivering a 2048x2048 PNG: in chunks to a client with gRPC's default 4 MiB receive limit, against the same
image in one message to a client that raised its limit.

    python benchmarks/bench_delivery.py            # 10 interleaved runs each after 2 warm-up
    python benchmarks/bench_delivery.py --reps 20
    python benchmarks/bench_delivery.py --quick    # one run each: a check that it runs

Two servers in this process, the same in all but `image_chunk_bytes` (3 MiB, the default, against 64 MiB: one
message). A stand-in for the two-stage runner returns the same 2048x2048 noise image every time (a PNG of
about 12 MB, the worst case for size), so the time measured is encoding, the stream and reassembly, not
denoising. Each client is `refinery.client.Client`: it reassembles chunks. Timed from the call to the image's
bytes in hand; runs alternate so drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from modelstore import ModelStore, StoreSettings
from refinery.client import Client
from refinery.client import Image as ClientImage
from server.app import RefineryServer
from server.core.domain import RenderShape, Sample
from server.core.logs import quiet_model_libraries
from server.core.settings import Settings
from server.generation.pipelines import PipelinePair
from server.generation.runner import RunResult, StageTimings, StepObserver

SIDE = 2048
MIB = 1024 * 1024


class NoiseRunner:
    def __init__(self) -> None:
        rng = numpy.random.default_rng(7)
        self.image = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=numpy.uint8), mode="RGB")

    def __call__(
        self, pair: PipelinePair, shape: RenderShape, samples: Sequence[Sample], observer: StepObserver
    ) -> RunResult:
        return RunResult([self.image for _ in samples], StageTimings())


class Served:
    def __init__(self, settings: Settings, store: ModelStore) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = RefineryServer(settings, store=store, run=NoiseRunner())
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(300)
        asyncio.run_coroutine_threadsafe(self.server.wait_ready(), self.loop).result(300)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(60)


def deliver(client: Client) -> tuple[float, int]:
    started = time.perf_counter()
    images = [e for e in client.generate("noise", steps=2, seed=1, timeout=600) if isinstance(e, ClientImage)]
    return time.perf_counter() - started, len(images[0].data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parse_args(parser, {"reps": 1, "warmup": 0})
    quiet_model_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(StoreSettings(cache_dir=Path(tmp), offline=True))
        base = Settings(store=store.settings, host="127.0.0.1", port=0, devices=("cpu",), drain_delay_s=0.0)
        chunked = Served(base, store)
        whole = Served(replace(base, image_chunk_bytes=64 * MIB), store)
        clients = {
            "chunks, default 4 MiB limit": (Client(f"127.0.0.1:{chunked.server.port}", max_receive_bytes=4 * MIB)),
            "one message, raised limit": (Client(f"127.0.0.1:{whole.server.port}", max_receive_bytes=64 * MIB)),
        }
        times: dict[str, list[float]] = {name: [] for name in clients}
        size = 0
        for rep in range(args.warmup + args.reps):
            for name, client in clients.items():
                seconds, size = deliver(client)
                if rep >= args.warmup:
                    times[name].append(seconds)
        for client in clients.values():
            client.close()
        chunked.close()
        whole.close()
    print(f"{SIDE}x{SIDE} PNG of noise, {size / MIB:.1f} MiB; {args.reps} interleaved runs each")
    print(f"{'':32}{'median ms':>12}{'min ms':>10}")
    for name, values in times.items():
        print(f"{name:32}{statistics.median(values) * 1e3:12.1f}{min(values) * 1e3:10.1f}")
    first, second = (statistics.median(v) for v in times.values())
    print(f"ratio chunks / one message (medians): {first / second:.3f}")


if __name__ == "__main__":
    main()
