"""The scheduler on CPU with the tiny built-in models: what batching buys, what a load costs, what the
scheduler itself costs per request.

    python benchmarks/bench_scheduler.py            # all four, a few minutes on 2 cores
    python benchmarks/bench_scheduler.py --quick    # the same, tiny counts: a check that it runs

1. Throughput of N concurrent requests (same pair and shape, one image each) through gRPC with --max-batch 4
   against --max-batch 1, same server settings otherwise, measured side by side in one run.
2. Requests per second for a warm pair against a pair that must be loaded each time (a budget that holds one
   pair, requests alternating between two pairs, so every request evicts and loads).
3. Scheduler overhead per request: submit to finish with stand-in pipelines that do no work, so what is left
   is admission, resolution (cached), placement, events and bookkeeping.
4. Encoding beside the device: N concurrent requests whose stand-in "device" time is a sleep that leaves the
   CPU free, as a GPU does, returning 1024x1024 images that are really PNG-encoded; --encode-threads 2 against
   0, alternating. (benchmarks/gpu_encode_overlap.py is the same comparison with real SDXL on a GPU.)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from modelstore import ModelStore, StoreSettings, parse_air
from modelstore.components import components_of
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.app import RefineryServer
from server.core.domain import ImageFormat, Job, PairKey, RefinerSpec, Sampler, StartPercentage
from server.core.logs import quiet_model_libraries
from server.core.settings import DEFAULT_BASE, DEFAULT_REFINER, Security, Settings
from server.generation.runner import RunResult, StageTimings
from server.scheduling.scheduler import Scheduler
from tests.fixtures.variants import write_variant_base

PAIR = PairKey(parse_air(DEFAULT_BASE), parse_air(DEFAULT_REFINER))


class InProcess:
    """A RefineryServer on its own event loop thread, as in production; clients use plain gRPC."""

    def __init__(self, settings: Settings, store: ModelStore, **server_args: Any) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = RefineryServer(settings, store=store, **server_args)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(300)
        asyncio.run_coroutine_threadsafe(self.server.wait_ready(), self.loop).result(300)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.GenerationServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def generate(self, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
        responses = list(self.stub.Generate(request, timeout=600))
        assert responses[-1].WhichOneof("event") == "image"
        return responses

    def close(self) -> None:
        self.channel.close()
        # The loop thread is a daemon and is left running: stopping it under grpc.aio's poller makes the
        # poller report a closed descriptor at exit.
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(60)


def request(seed: int, model: str = "", steps: int = 20) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        positive_prompt=f"a lighthouse, variation {seed}",
        model=model,
        seed=seed,
        steps=steps,
        refiner=pb.Refiner(start_step_percentage=90),
    )


def throughput(settings: Settings, store: ModelStore, n: int, rounds: int) -> dict[int, float]:
    """images/s of n concurrent requests, for max_batch 1 and 4."""
    result: dict[int, list[float]] = {1: [], 4: []}
    servers = {b: InProcess(replace(settings, max_batch=b), store) for b in (1, 4)}
    try:
        for server in servers.values():
            server.generate(request(0))  # warm-up
        for _ in range(rounds):  # alternate so machine drift hits both alike
            for b, server in servers.items():
                with ThreadPoolExecutor(n) as pool:
                    started = time.perf_counter()
                    list(pool.map(server.generate, [request(i) for i in range(n)]))
                    result[b].append(n / (time.perf_counter() - started))
    finally:
        for server in servers.values():
            server.close()
    return {b: statistics.median(v) for b, v in result.items()}


def warm_vs_cold(settings: Settings, store: ModelStore, other: str, reps: int) -> tuple[float, float]:
    pair_bytes = sum(
        c.full_bytes
        for c in {
            c.fingerprint: c for m in (DEFAULT_BASE, DEFAULT_REFINER) for c in components_of(store.resolve(m))
        }.values()
    )
    server = InProcess(replace(settings, pins=(), budget_bytes=pair_bytes + 1_000_000), store)
    try:
        server.generate(request(0))
        warm = [_timed(server.generate, request(i)) for i in range(reps)]
        cold = []
        for i in range(reps):  # every request switches pair: evict, load
            model = other if i % 2 == 0 else ""
            cold.append(_timed(server.generate, request(i, model=model)))
    finally:
        server.close()
    return 1 / statistics.median(warm), 1 / statistics.median(cold)


def _timed(fn: Any, arg: Any) -> float:
    started = time.perf_counter()
    fn(arg)
    return time.perf_counter() - started


class _Sink:
    def __init__(self) -> None:
        self.done = threading.Event()

    def emit(self, event: Any) -> None:
        pass

    def close(self, error: BaseException | None) -> None:
        assert error is None, error
        self.done.set()


def _stand_in_scheduler(settings: Settings, store: ModelStore, run: Any) -> Scheduler:
    """The real scheduler with stand-in pipelines: nothing is loaded, `run` plays the device."""

    def loader(record: Any, *, role: str, components: Any, **_: Any) -> Any:
        parts = {c.name: components.get(c.name) or object() for c in components_of(record)}
        return SimpleNamespace(
            components=parts, unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)), vae_scale_factor=8
        )

    scheduler = Scheduler(replace(settings, max_batch=1), store, loader=loader, run=run)
    scheduler.start()
    return scheduler


_JOB = Job(
    request_id="bench",
    model=parse_air(DEFAULT_BASE),
    refiner=RefinerSpec(parse_air(DEFAULT_REFINER), StartPercentage(90)),
    prompt="x",
    negative_prompt=None,
    width=64,
    height=64,
    steps=20,
    base_steps=18,
    cfg_scale=7.0,
    seed=1,
    sampler=Sampler.EULER,
    number_results=1,
    output_format=ImageFormat.PNG,
    preview_every=0,
)


def overhead(settings: Settings, store: ModelStore, jobs: int) -> float:
    """Median seconds from submit to finish with pipelines that do nothing."""

    def run(pair: Any, shape: Any, samples: Any, observer: Any) -> RunResult:
        return RunResult([Image.new("RGB", (8, 8)) for _ in samples], StageTimings())

    scheduler = _stand_in_scheduler(settings, store, run)
    times = []
    try:
        for _ in range(jobs):
            sink = _Sink()
            started = time.perf_counter()
            scheduler.submit(_JOB, sink)
            assert sink.done.wait(60)
            times.append(time.perf_counter() - started)
    finally:
        scheduler.close(10)
    return statistics.median(times[5:])


def encode_overlap(settings: Settings, store: ModelStore, n: int, device_s: float, reps: int) -> dict[int, float]:
    """Images per second for `n` requests at once, by `encode_threads` (0 and 2), alternating `reps` times."""
    noise = Image.frombytes("RGB", (1024, 1024), random.Random(0).randbytes(1024 * 1024 * 3))

    def run(pair: Any, shape: Any, samples: Any, observer: Any) -> RunResult:
        time.sleep(device_s)  # the device computing; like a GPU, it leaves the CPU free
        return RunResult([noise.copy() for _ in samples], StageTimings())

    rates: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(reps):
        for threads in rates:
            scheduler = _stand_in_scheduler(replace(settings, encode_threads=threads), store, run)
            try:
                sinks = [_Sink() for _ in range(n)]
                started = time.perf_counter()
                for sink in sinks:
                    scheduler.submit(_JOB, sink)
                for sink in sinks:
                    assert sink.done.wait(600)
                rates[threads].append(n / (time.perf_counter() - started))
            finally:
                scheduler.close(10)
    return {threads: statistics.median(r) for threads, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--device-s", type=float, default=0.3, help="stand-in device time per request (part 4)")
    quick = {"concurrent": 2, "rounds": 1, "reps": 2, "jobs": 20, "device_s": 0.05}
    args = parse_args(parser, quick)
    quiet_model_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(StoreSettings(cache_dir=Path(tmp) / "cache"))
        # Part 2's second base is a local model that the requests name: the server serves only the folders
        # it is told to (--local-models).
        security = Security(local_model_roots=(Path(tmp),))
        settings = Settings(
            store=store.settings, host="127.0.0.1", port=0, devices=("cpu",), pins=(PAIR,), security=security
        )
        other = _other_base(store, Path(tmp))
        ips = throughput(settings, store, args.concurrent, args.rounds)
        warm, cold = warm_vs_cold(settings, store, other, args.reps)
        per_job = overhead(settings, store, args.jobs)
        overlap = encode_overlap(settings, store, args.concurrent, args.device_s, args.rounds)
    print(f"\ntiny SDXL pair, CPU, 64x64, 20 steps (18+2), {args.concurrent} concurrent requests")
    print(f"  {'--max-batch 1':<40} {ips[1]:.2f} images/s")
    print(f"  {'--max-batch 4':<40} {ips[4]:.2f} images/s  ({ips[4] / ips[1]:.2f}x)")
    print(f"  {'warm pair':<40} {warm:.2f} requests/s")
    print(f"  {'pair loaded for every request':<40} {cold:.2f} requests/s  ({warm / cold:.2f}x slower)")
    print(f"  {'scheduler overhead per request':<40} {per_job * 1000:.2f} ms (submit to finish, no-op pipelines)")
    print(
        f"\nstand-in device ({args.device_s:.2f} s per request, CPU left free), 1024x1024 PNG results, "
        f"{args.concurrent} concurrent requests"
    )
    print(f"  {'--encode-threads 0':<40} {overlap[0]:.2f} images/s")
    print(f"  {'--encode-threads 2':<40} {overlap[2]:.2f} images/s  ({overlap[2] / overlap[0]:.2f}x)")


def _other_base(store: ModelStore, tmp: Path) -> str:
    return f"local:{write_variant_base(store.resolve(DEFAULT_BASE).path, tmp / 'other-base')}"


if __name__ == "__main__":
    main()
