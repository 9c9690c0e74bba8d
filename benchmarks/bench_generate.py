"""What the service adds: `Generate` end to end through gRPC against the same two-stage diffusers call.

    python benchmarks/bench_generate.py     # the tiny built-in pair, 64x64, 20 steps, refiner at 90 %
    python benchmarks/bench_generate.py --reps 30 --steps 30 --size 128
    python benchmarks/bench_generate.py --quick     # 10 steps, one run each: a check that it runs

Both paths use the same device, dtype and torch thread count, and run interleaved (direct, service, direct,
...) after a warm-up, so drift in machine load hits both alike:

- direct: StableDiffusionXLPipeline(denoising_end=f, output_type="latent") then
  StableDiffusionXLImg2ImgPipeline(denoising_start=f), with f chosen on the timestep grid so the split is the
  service's (the integration tests prove the images equal pixel for pixel);
- service: a `refinery.v1.GenerationService/Generate` call over loopback gRPC to `refinery serve` running in
  its own process (models preloaded), timed from the call to the last message, which carries the PNG; also
  the time to the first Progress event.

Target: median service / median direct <= 1.10.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.core.logs import quiet_model_libraries
from server.core.settings import DEFAULT_BASE, DEFAULT_REFINER
from server.generation.split import StartPercentage, base_step_count
from server.scheduling.devices import cpu_threads, resolve_device

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky"


@dataclass(frozen=True)
class Params:
    size: int
    steps: int
    base_steps: int
    seed: int
    cfg: float


class Direct:
    def __init__(self, store: ModelStore, device: str, dtype: torch.dtype) -> None:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        common: dict[str, Any] = {
            "dtype": dtype,
            "local_files_only": True,
            "use_safetensors": True,
            "add_watermarker": False,
        }
        self.base = StableDiffusionXLPipeline.from_pretrained(str(store.resolve(DEFAULT_BASE).path), **common)
        self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(store.resolve(DEFAULT_REFINER).path), **common
        )
        for pipe in (self.base, self.refiner):
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
        self.config = self.base.scheduler.config

    def generate(self, p: Params) -> Image.Image:
        from diffusers import EulerDiscreteScheduler

        grid = EulerDiscreteScheduler.from_config(self.config)
        grid.set_timesteps(p.steps)
        fraction = 1 - (math.floor(float(grid.timesteps[p.base_steps])) + 1) / 1000
        self.base.scheduler = EulerDiscreteScheduler.from_config(self.config)
        self.refiner.scheduler = EulerDiscreteScheduler.from_config(self.config)
        generator = torch.Generator("cpu").manual_seed(p.seed)
        latents = self.base(
            prompt=PROMPT,
            width=p.size,
            height=p.size,
            num_inference_steps=p.steps,
            denoising_end=fraction,
            guidance_scale=p.cfg,
            generator=generator,
            output_type="latent",
        ).images
        image: Image.Image = self.refiner(
            prompt=PROMPT,
            image=latents,
            num_inference_steps=p.steps,
            denoising_start=fraction,
            guidance_scale=p.cfg,
            generator=generator,
        ).images[0]
        return image


class Service:
    """`refinery serve` in its own process (models preloaded), called with the plain synchronous client, as an
    internal service would call it."""

    def __init__(self, args: argparse.Namespace) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--device", args.device, "--log-level", "WARNING"]
        if args.cache_dir:
            command += ["--cache-dir", str(args.cache_dir)]
        root = Path(__file__).resolve().parent.parent
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        }
        self._process = subprocess.Popen(command, cwd=root, env=env)
        self._channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        grpc.channel_ready_future(self._channel).result(timeout=300)
        watch = health_pb2_grpc.HealthStub(self._channel).Watch(
            health_pb2.HealthCheckRequest(service="refinery.v1.GenerationService"), timeout=300
        )
        for update in watch:  # the default models are resident once this says SERVING
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                break
        watch.cancel()
        self._stub = pb_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def generate(self, p: Params) -> tuple[float, float, bytes]:
        """(seconds to the first Progress, seconds to the end, PNG)."""
        request = pb.GenerateRequest(
            positive_prompt=PROMPT,
            width=p.size,
            height=p.size,
            steps=p.steps,
            cfg_scale=p.cfg,
            seed=p.seed,
            refiner=pb.Refiner(model=DEFAULT_REFINER, start_step=p.base_steps + 1),
        )
        started = time.perf_counter()
        first_progress = math.nan
        png = b""
        for response in self._stub.Generate(request):
            kind = response.WhichOneof("event")
            if kind == "progress" and math.isnan(first_progress):
                first_progress = time.perf_counter() - started
            elif kind == "image":
                png = response.image.data
        return first_progress, time.perf_counter() - started, png

    def close(self) -> None:
        self._channel.close()
        self._process.send_signal(signal.SIGTERM)
        self._process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed runs of each path (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each path first (default 3)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--refiner-start", type=int, default=90, help="percent (default 90)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: REFINERY_CACHE_DIR, ~/.cache)")
    args = parse_args(parser, {"reps": 1, "warmup": 1, "steps": 10})

    quiet_model_libraries()
    store = ModelStore(StoreSettings.from_env(cache_dir=args.cache_dir, offline=True))
    service = Service(args)
    # The same device, dtype and torch thread count that the server chose for itself.
    device = resolve_device(args.device)
    torch.set_num_threads(cpu_threads())
    direct = Direct(store, device.name, device.dtype)
    p = Params(args.size, args.steps, base_step_count(args.steps, StartPercentage(args.refiner_start)), 7, 7.0)

    for _ in range(args.warmup):
        direct.generate(p)
        service.generate(p)
    direct_s: list[float] = []
    service_s: list[float] = []
    first_s: list[float] = []
    identical = True
    for _ in range(args.reps):
        started = time.perf_counter()
        expected = direct.generate(p)
        direct_s.append(time.perf_counter() - started)
        first, total, png = service.generate(p)
        service_s.append(total)
        first_s.append(first)
        with Image.open(io.BytesIO(png)) as got:
            identical = identical and got.convert("RGB").tobytes() == expected.convert("RGB").tobytes()
    service.close()

    def row(name: str, values: list[float]) -> str:
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        median = statistics.median(values)
        return f"{name:<34} {median * 1000:>9.1f} {ordered[0] * 1000:>9.1f} {p90 * 1000:>9.1f}"

    ratio = statistics.median(service_s) / statistics.median(direct_s)
    print(
        f"{args.size}x{args.size}, {p.steps} steps = {p.base_steps} base + {p.steps - p.base_steps} refiner, "
        f"Euler, cfg {p.cfg}; device {device.label}, {torch.get_num_threads()} torch thread(s); "
        f"{args.reps} interleaved runs each after {args.warmup} warm-up"
    )
    print(f"{'':<34} {'median ms':>9} {'min ms':>9} {'p90 ms':>9}")
    print(row("diffusers in-process (direct)", direct_s))
    print(row("Generate via gRPC (end to end)", service_s))
    print(row("Generate: first Progress event", first_s))
    print(f"ratio service/direct (medians): {ratio:.3f}  (target <= 1.10)")
    print(f"service PNG equals the direct image pixel for pixel: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
