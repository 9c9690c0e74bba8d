"""Full-size SDXL on a GPU: the service against hand-run diffusers, images per second by batch size, and the
cost of switching pairs. One unattended run of a few minutes on one H100/H200.

    python benchmarks/gpu_sdxl.py                     # full size, cuda:0, 1024x1024, 30 steps, refiner at 90 %
    python benchmarks/gpu_sdxl.py --tiny --device cpu # the same flow on the tiny built-in models (a dry run)

What it builds (random weights: timing does not depend on the values; benchmarks/_random_sdxl.py):
  A  an SDXL base,  R  an SDXL refiner sharing A's VAE and OpenCLIP encoder files (as the official pair does),
  B  a second base ("another fine-tune") sharing everything with A but its UNet.

What it measures, in one run:
  1. direct vs service: A+R by hand with diffusers (base with denoising_end, refiner with denoising_start,
     R built with A's text_encoder_2 and VAE as the diffusers docs do) against `Generate` through gRPC to
     `refinery serve` in its own process, same seed and parameters, interleaved; medians and their ratio, and
     the service's time to the first Progress event;
  2. images per second at batch 1, 2 and 4 (one request with number_results = b: one batch of b images);
  3. a pair switch: with a budget that holds one pair only, a request for B (evicts A+R's UNets, loads B's),
     then A+R again; each against a warm request, with the device's allocated memory before and after. B is
     pulled (registered and measured) beforehand, as an operator would, so only evicting and loading count.
Beside each client-side figure it reads the server's own timings of the request from its JSON log, which
tells what happens inside the server from what gRPC and the client add.
It prints a table and writes the figures as JSON to $OUT/gpu_sdxl.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._random_sdxl import write_random_sdxl
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from refinery.v1 import models_pb2, models_pb2_grpc, status_pb2, status_pb2_grpc
from tests.fixtures.variants import write_variant_base

_SERVER_PHASES = ("queued_s", "loading_s", "base_s", "refiner_s", "decode_s", "encode_s")
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, highly detailed"
SEED = 1234


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_pair(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """A (a base) and R (a refiner sharing A's VAE and OpenCLIP files): random full-size weights, or copies of
    the tiny built-in pair with --tiny."""
    if args.tiny:
        from modelstore import ModelStore, StoreSettings

        store = ModelStore(StoreSettings(cache_dir=root / "tiny-cache"))
        folders = {}
        for name, air in (("A", "builtin:tiny-sdxl-base@1"), ("R", "builtin:tiny-sdxl-refiner@1")):
            folders[name] = root / name
            shutil.copytree(store.resolve(air).path, folders[name], symlinks=False)
        return folders
    a = write_random_sdxl(root / "A", refiner=False, seed=1, device=args.device)
    return {"A": a, "R": write_random_sdxl(root / "R", refiner=True, seed=2, device=args.device, share_from=a)}


def build_models(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The pair, and B: another base sharing everything with A but its UNet."""
    started = time.perf_counter()
    folders = build_pair(root, args)
    if args.tiny:
        folders["B"] = write_variant_base(folders["A"], root / "B")
    else:
        folders["B"] = write_random_sdxl(root / "B", refiner=False, seed=3, device=args.device, share_from=folders["A"])
    size = sum(
        p.stat().st_size for f in folders.values() for p in f.rglob("*") if p.is_file() and p.stat().st_nlink == 1
    )
    log(f"built A, R, B in {time.perf_counter() - started:.1f}s ({size / 2**30:.1f} GiB written)")
    return folders


class Direct:
    """The two-stage diffusers call made by hand, as the diffusers docs show it."""

    def __init__(self, folders: dict[str, Path], device: str) -> None:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        common: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
        self.base = StableDiffusionXLPipeline.from_pretrained(str(folders["A"]), add_watermarker=False, **common)
        self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(folders["R"]),
            text_encoder_2=self.base.text_encoder_2,
            vae=self.base.vae,
            add_watermarker=False,
            **common,
        )
        for pipe in (self.base, self.refiner):
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
        self.device = device

    def generate(self, size: int, steps: int, base_steps: int) -> tuple[float, float]:
        """Seconds for the whole call, and for the base stage alone (synchronised at the hand-off)."""
        from diffusers import EulerDiscreteScheduler

        config = self.base.scheduler.config
        grid = EulerDiscreteScheduler.from_config(config)
        grid.set_timesteps(steps)
        fraction = 1 - (math.floor(float(grid.timesteps[base_steps])) + 1) / 1000
        self.base.scheduler = EulerDiscreteScheduler.from_config(config)
        self.refiner.scheduler = EulerDiscreteScheduler.from_config(config)
        _sync(self.device)
        started = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(SEED)
        latents = self.base(
            prompt=PROMPT,
            width=size,
            height=size,
            num_inference_steps=steps,
            denoising_end=fraction,
            generator=generator,
            output_type="latent",
        ).images
        _sync(self.device)
        base_s = time.perf_counter() - started
        self.refiner(
            prompt=PROMPT, image=latents, num_inference_steps=steps, denoising_start=fraction, generator=generator
        ).images[0].tobytes()
        _sync(self.device)
        return time.perf_counter() - started, base_s


class Service:
    """`refinery serve` in its own process, called over loopback gRPC like any internal client would."""

    def __init__(
        self, folders: dict[str, Path], args: argparse.Namespace, cache: Path, extra: Sequence[str] = ()
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.pair = f"local:{folders['A']}+local:{folders['R']}"
        command = [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--devices",
            args.device,
            # Nothing pinned: pinned pairs are never evicted, and the switch below needs A+R to be evictable.
            "--pin",
            "none",
            "--max-batch",
            "4",
            "--budget",
            args.budget,
            "--model",
            f"local:{folders['A']}",
            "--refiner",
            f"local:{folders['R']}",
            "--cache-dir",
            str(cache),
            "--log-level",
            "INFO",
            # One JSON object per line: the per-request line carries its timings as fields (read back below).
            "--log-json",
            *extra,
        ]
        cache.mkdir(parents=True, exist_ok=True)
        self.log_path = cache / "serve.log"
        self._log_offset = 0
        self.process = subprocess.Popen(command, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 2**26)])
        self.stub = pb_grpc.GenerationServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.status_stub = status_pb2_grpc.ServerServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.models_stub = models_pb2_grpc.ModelServiceStub(self.channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(self.channel)
        started = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"refinery serve exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service="refinery.v1.GenerationService"), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        self.ready_s = time.perf_counter() - started
        log(f"service SERVING in {self.ready_s:.1f}s")

    def generate(self, size: int, steps: int, n: int = 1, model: str = "", refiner: bool = True) -> tuple[float, float]:
        request = pb.GenerateRequest(
            positive_prompt=PROMPT, model=model, width=size, height=size, steps=steps, seed=SEED, number_results=n
        )
        if refiner:
            request.refiner.CopyFrom(pb.Refiner(start_step_percentage=90))
        started = time.perf_counter()
        first_progress = 0.0
        images = 0
        for response in self.stub.Generate(request, timeout=600):
            kind = response.WhichOneof("event")
            if kind == "progress" and not first_progress:
                first_progress = time.perf_counter() - started
            images += kind == "image"
        assert images == n, f"expected {n} images, got {images}"
        return time.perf_counter() - started, first_progress

    def timings(self) -> dict[str, float]:
        """The server's own timings (queued, loading, base, refiner, decode, encode) of the request that just
        ended; its log line is written as the stream ends, so it may take a moment to appear."""
        deadline = time.monotonic() + 5
        while (found := self._new_timings()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return found or {}

    def timed(self, size: int, steps: int, **kwargs: Any) -> tuple[float, float, dict[str, float]]:
        """`generate`, plus the server's timings of that request."""
        self._new_timings()  # skip what earlier requests logged
        total, first = self.generate(size, steps, **kwargs)
        return total, first, self.timings()

    def _new_timings(self) -> dict[str, float] | None:
        """The last request timings logged since the previous call (whole lines only), or None."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        self._log_offset += len(data)
        found = None
        for line in data.decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "timings" in entry:
                found = dict(entry["timings"])
        return found

    def pull(self, model: str) -> float:
        """PullModel: registers (hashes) and measures `model` without loading it, as an operator pre-fetches."""
        started = time.perf_counter()
        for _ in self.models_stub.PullModel(models_pb2.PullModelRequest(model=model), timeout=600):
            pass
        return time.perf_counter() - started

    def allocated(self) -> int:
        status = self.status_stub.GetStatus(status_pb2.GetStatusRequest(), timeout=30)
        return int(status.devices[0].allocated_bytes)

    def close(self) -> None:
        self.channel.close()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _switch(
    service: Service, folders: dict[str, Path], size: int, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    warm = statistics.median(service.generate(size, args.steps)[0] for _ in range(2))
    before = service.allocated()
    b = f"local:{folders['B']}"
    to_b, _, to_b_server = service.timed(size, args.steps, model=b, refiner=False)
    after_b = service.allocated()
    warm_b = service.generate(size, args.steps, model=b, refiner=False)[0]
    back, _, back_server = service.timed(size, args.steps)
    log(f"switch to B: {to_b:.2f}s {to_b_server}; back to A+R: {back:.2f}s {back_server}")
    results.update(
        switch_to_b_loading_s=to_b_server.get("loading_s", float("nan")),
        switch_back_loading_s=back_server.get("loading_s", float("nan")),
        warm_pair_s=warm,
        switch_to_b_s=to_b,
        warm_b_s=warm_b,
        switch_back_s=back,
        switch_cost_s=to_b - warm_b,
        switch_back_cost_s=back - warm,
        allocated_with_a_r_gib=before / 2**30,
        allocated_with_b_gib=after_b / 2**30,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny built-in models (a CPU dry run)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--size", type=int, default=None, help="default 1024 (64 with --tiny)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", default=None, help="weights budget holding one pair (default 14GiB; 45MB tiny)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only-switch", action="store_true", help="reuse --workdir's models; measure the switch only")
    args = parser.parse_args()
    size = args.size or (64 if args.tiny else 1024)
    args.budget = args.budget or ("45MB" if args.tiny else "14GiB")
    base_steps = min(max((2 * args.steps * 90 + 100) // 200, 1), args.steps - 1)  # the contract's 90 %
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "size": size,
        "steps": args.steps,
        "base_steps": base_steps,
        "refiner_steps": args.steps - base_steps,
    }
    log(
        f"{results['device']}, torch {torch.__version__}, {size}x{size}, "
        f"{args.steps} steps ({base_steps}+{args.steps - base_steps})"
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refinery-gpu-bench-"))
    if args.only_switch and (workdir / "models" / "B").is_dir():
        folders = {n: workdir / "models" / n for n in "ARB"}
    else:
        folders = build_models(workdir / "models", args)
    service = Service(folders, args, workdir / "cache")
    results["service_ready_s"] = service.ready_s
    first, _ = service.generate(size, args.steps)  # registers (hashes) and loads A+R, then generates
    results["first_request_s"] = first
    log(f"first request (register, hash, load A+R, generate): {first:.1f}s")
    # B is pulled up front, as an operator would, so the switch below times evicting and loading only.
    results["pull_b_s"] = service.pull(f"local:{folders['B']}")
    log(f"PullModel B (register, hash, measure): {results['pull_b_s']:.1f}s")
    try:
        if args.only_switch:
            _switch(service, folders, size, args, results)
            print(json.dumps(results, indent=2))
            return
        started = time.perf_counter()
        direct = Direct(folders, args.device)
        log(f"direct pipelines loaded in {time.perf_counter() - started:.1f}s")

        # 1. direct vs service, interleaved after a warm-up of each
        direct.generate(size, args.steps, base_steps)
        service.generate(size, args.steps)
        direct_s, direct_base_s, service_s, first_s, inside_s, service_base_s = [], [], [], [], [], []
        for _ in range(args.reps):
            total, base = direct.generate(size, args.steps, base_steps)
            direct_s.append(total)
            direct_base_s.append(base)
            total, first, server = service.timed(size, args.steps)
            service_s.append(total)
            first_s.append(first)
            # What the server itself accounts for, from admission to the PNG; the rest is gRPC and the client.
            inside_s.append(sum(server.get(k, 0.0) for k in _SERVER_PHASES))
            service_base_s.append(server.get("base_s", float("nan")))
            log(f"direct {direct_s[-1]:.3f}s (base {base:.3f}s); service {total:.3f}s, server {server}")
        results["direct_median_s"] = statistics.median(direct_s)
        results["service_median_s"] = statistics.median(service_s)
        results["ratio"] = results["service_median_s"] / results["direct_median_s"]
        results["direct_min_s"], results["service_min_s"] = min(direct_s), min(service_s)
        results["ratio_of_minima"] = results["service_min_s"] / results["direct_min_s"]
        results["first_progress_median_s"] = statistics.median(first_s)
        results["direct_base_median_s"] = statistics.median(direct_base_s)
        results["service_base_median_s"] = statistics.median(service_base_s)
        results["service_inside_median_s"] = statistics.median(inside_s)
        results["service_outside_median_s"] = statistics.median(t - i for t, i in zip(service_s, inside_s, strict=True))
        del direct
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None

        # 2. images per second by batch size
        for b in (1, 2, 4):
            service.generate(size, args.steps, n=b)  # warm-up at this batch size
            times = [service.generate(size, args.steps, n=b)[0] for _ in range(max(1, args.reps - 1))]
            results[f"batch{b}_s"] = statistics.median(times)
            results[f"batch{b}_images_per_s"] = b / statistics.median(times)
            log(f"batch {b}: {times}")

        # 3. pair switch under a budget that holds one pair
        _switch(service, folders, size, args, results)
    finally:
        service.close()
        log(f"service log tail:\n{''.join(service.log_path.read_text().splitlines(True)[-12:])}")

    rows = [
        ("direct diffusers, median", f"{results['direct_median_s']:.3f} s"),
        ("service via gRPC, median", f"{results['service_median_s']:.3f} s"),
        ("ratio service / direct", f"{results['ratio']:.3f} (of the minima {results['ratio_of_minima']:.3f})"),
        (
            "base stage, direct / service",
            f"{results['direct_base_median_s']:.3f} / {results['service_base_median_s']:.3f} s",
        ),
        (
            "service: inside the server / outside",
            f"{results['service_inside_median_s']:.3f} / {results['service_outside_median_s']:.3f} s",
        ),
        ("time to first progress", f"{results['first_progress_median_s']:.3f} s"),
        *[
            (f"batch {b}", f"{results[f'batch{b}_s']:.3f} s, {results[f'batch{b}_images_per_s']:.3f} images/s")
            for b in (1, 2, 4)
        ],
        ("warm A+R request", f"{results['warm_pair_s']:.3f} s"),
        (
            "switch A+R -> B (evict + load)",
            f"{results['switch_to_b_s']:.3f} s (+{results['switch_cost_s']:.3f} s; "
            f"loading {results['switch_to_b_loading_s']:.3f} s)",
        ),
        (
            "switch B -> A+R",
            f"{results['switch_back_s']:.3f} s (+{results['switch_back_cost_s']:.3f} s; "
            f"loading {results['switch_back_loading_s']:.3f} s)",
        ),
        (
            "allocated with A+R / with B",
            f"{results['allocated_with_a_r_gib']:.2f} / {results['allocated_with_b_gib']:.2f} GiB",
        ),
        ("service start to SERVING", f"{results['service_ready_s']:.1f} s"),
        ("first request (hash + load A+R)", f"{results['first_request_s']:.1f} s"),
        ("PullModel of B (hash, measure)", f"{results['pull_b_s']:.1f} s"),
    ]
    print(
        f"\n{results['device']} · {size}x{size} · {args.steps} steps "
        f"({base_steps}+{args.steps - base_steps}) · torch {results['torch']}"
    )
    for name, value in rows:
        print(f"  {name:<34} {value}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_sdxl.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
