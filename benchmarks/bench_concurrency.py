"""Where a request's time goes when 8 clients call at once, on a CPU stand-in for a GPU: the real server
(gRPC, scheduler, worker, events, encoder threads, PNG) in its own process, with a device that behaves like one.

    .venv/bin/python benchmarks/bench_concurrency.py              # 3 rounds, about 2 minutes
    .venv/bin/python benchmarks/bench_concurrency.py --py-spy 8   # also sample the server for 8 s under load
    .venv/bin/python benchmarks/bench_concurrency.py --quick      # 2 requests, a fast device: does it run

The stand-in device runs 30 steps (27 + 3) per image. Each step holds the GIL for `--launch-ms` (the CPU work of
launching a step's kernels, as eager PyTorch does) and queues `--gpu-ms` of device time on a virtual device
clock; the worker blocks (GIL released) only when it is more than one step ahead of the device, and at the end,
as CUDA's launch queue and the final copy to the host make it. It returns a real 1024x1024 picture (PNG
encoded for real, at the server's default level). Sequential requests and bursts of 8 concurrent ones (each
its own batch, as with --max-batch 1) alternate on the same server; per-image times are compared side by side,
with the device's busy fraction (GetStatus busy_time over wall time) and the server's own per-stage timings.
With --py-spy N, py-spy samples the server's threads during a burst and prints where each one spends its time
and how often it holds the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._profile import thread_profile
from benchmarks._quick import parse_args
from benchmarks._service import free_port
from benchmarks.bench_encode import natural_image
from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from refinery.v1 import status_pb2, status_pb2_grpc

STEPS, BASE_STEPS = 30, 27


class StandInDevice:
    """`PipelineRunner` with a virtual device clock (see the module docstring)."""

    def __init__(self, launch_s: float, gpu_s: float, decode_s: float) -> None:
        self.launch_s, self.gpu_s, self.decode_s = launch_s, gpu_s, decode_s
        self.image = natural_image(1024)

    def __call__(self, pair: Any, shape: Any, samples: Any, observer: Any) -> Any:
        from server.core.domain import Stage
        from server.generation.runner import RunResult, StageTimings, StepState

        device_free = time.perf_counter()
        for step in range(1, STEPS + 1):
            spin_until = time.perf_counter() + self.launch_s
            while time.perf_counter() < spin_until:  # Python holding the GIL, like eager kernel launches
                pass
            device_free = max(device_free, time.perf_counter()) + self.gpu_s
            ahead = device_free - time.perf_counter() - self.gpu_s
            if ahead > 0:
                time.sleep(ahead)  # the launch queue is full: wait for the device, GIL released
            stage = Stage.BASE if step <= BASE_STEPS else Stage.REFINER
            observer.on_step(StepState(stage, step, STEPS, step, STEPS, _LATENT, 1.0))
        time.sleep(max(0.0, device_free - time.perf_counter()) + self.decode_s)  # decode, copy to host
        return RunResult([self.image.copy() for _ in samples], StageTimings())


_LATENT: Any = None  # previews are not asked for: no step reads the latent


def stand_in_loader(record: Any, *, role: str, components: Any, **_: Any) -> Any:
    from modelstore.components import components_of

    parts = {c.name: components.get(c.name) or object() for c in components_of(record)}
    return SimpleNamespace(
        components=parts, unet=SimpleNamespace(config=SimpleNamespace(sample_size=128)), vae_scale_factor=8
    )


def serve(args: argparse.Namespace) -> None:
    """The server process: the real RefineryServer with the stand-in device, until killed."""
    from server.app import RefineryServer
    from server.core.logs import configure_logging
    from server.core.settings import Settings

    configure_logging("INFO", json_format=True)
    store = ModelStore(StoreSettings(cache_dir=args.cache))
    device = StandInDevice(args.launch_ms / 1000, args.gpu_ms / 1000, args.decode_ms / 1000)
    settings = Settings(store=store.settings, host="127.0.0.1", port=args.port, devices=("cpu",), max_batch=1)

    async def main() -> None:
        server = RefineryServer(settings, store=store, loader=stand_in_loader, run=device)
        await server.start()
        await server.wait_ready()
        await asyncio.Event().wait()

    asyncio.run(main())


class Client:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 2**26)])
        grpc.channel_ready_future(self.channel).result(timeout=120)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.status = status_pb2_grpc.ServerServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def generate(self, index: int) -> None:
        # A cfg of its own per request: no two requests share a batch, whatever --max-batch is.
        request = pb.GenerateRequest(positive_prompt="x", steps=STEPS, seed=index, cfg_scale=7 + index / 100)
        request.refiner.CopyFrom(pb.Refiner(start_step_percentage=90))
        assert sum(r.WhichOneof("event") == "image" for r in self.stub.Generate(request, timeout=600)) == 1

    def busy_s(self) -> float:
        status = self.status.GetStatus(status_pb2.GetStatusRequest(), timeout=30)
        return float(status.devices[0].busy_time.ToNanoseconds()) / 1e9


def measure(client: Client, n: int, concurrent: bool) -> tuple[float, float]:
    """Per-image seconds for `n` requests, and the device's busy fraction meanwhile."""
    busy, started = client.busy_s(), time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(client.generate, range(n)))
    else:
        for i in range(n):
            client.generate(i)
    wall = time.perf_counter() - started
    return wall / n, (client.busy_s() - busy) / wall


def main() -> None:
    quick = {"n": 2, "rounds": 1, "launch_ms": 1.0, "gpu_ms": 5.0, "decode_ms": 20.0}
    args = parse_args(_parser(), quick)
    args.port = args.port or free_port()
    if args.serve:
        serve(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        server = _start_server(args, Path(tmp), log_path)
        try:
            results = _rounds(Client(args.port), args, server.pid)
        finally:
            server.terminate()
            server.wait(30)
        results["server_timings_median"] = _median_timings(log_path)
    print(json.dumps(results, indent=2))


def _rounds(client: Client, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    client.generate(0)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"sequential": [], "concurrent": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(measure(client, args.n, concurrent=mode == "concurrent"))
    results: dict[str, Any] = {
        f"{mode}_per_image_s": statistics.median(r[0] for r in rs) for mode, rs in runs.items()
    } | {f"{mode}_device_busy": statistics.median(r[1] for r in rs) for mode, rs in runs.items()}
    results["ratio_concurrent_sequential"] = results["concurrent_per_image_s"] / results["sequential_per_image_s"]
    if args.py_spy:
        with ThreadPoolExecutor(1) as pool:
            burst = pool.submit(measure, client, args.n * 3, True)
            results["py_spy"] = thread_profile(pid, args.py_spy)
            burst.result()
    return results


def _start_server(args: argparse.Namespace, tmp: Path, log_path: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--serve", "--port", str(args.port), "--cache", str(tmp / "cache")]
    command += ["--launch-ms", str(args.launch_ms), "--gpu-ms", str(args.gpu_ms), "--decode-ms", str(args.decode_ms)]
    return subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def _median_timings(log_path: Path) -> dict[str, float]:
    rows = [json.loads(line)["timings"] for line in log_path.read_text().splitlines() if '"timings"' in line]
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]} if rows else {}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="requests per round, sequential and concurrent")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--launch-ms", type=float, default=15.0, help="GIL held per step (eager launches)")
    parser.add_argument("--gpu-ms", type=float, default=70.0, help="device time per step")
    parser.add_argument("--decode-ms", type=float, default=150.0, help="device time of the decode")
    parser.add_argument("--py-spy", type=int, default=0, help="sample the server for this many seconds")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    main()
