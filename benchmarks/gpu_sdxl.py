"""Full-size SDXL on one GPU, everything issue 12 asks for in one run of about 8 minutes: today's eager
service, the tuned service and diffusers run by hand with the same tuning, side by side on one machine.

    python benchmarks/gpu_sdxl.py                       # H100/H200: 1024x1024, 30 steps (27 + 3), fp16
    python benchmarks/gpu_sdxl.py --smoke               # the same flow on the tiny models on the CPU
    python benchmarks/gpu_sdxl.py --quick               # --smoke, 10 steps, one rep, no compiling: does it run

--quick is --smoke with small numbers and `--cpu-compile off`: the tuned runs keep the rest of the tuning but run
eagerly, because compiling the tiny UNets on a CPU takes minutes (the compile and restart sections then have no
shapes to wait for); `--quick --cpu-compile default` compiles too. It records nothing (its JSON stays in its
temporary folder, removed at the end) and exits 1 if a section failed (FP8's refusal on a CPU aside).

Random-weight SDXL base A and refiner R (sharing A's VAE and OpenCLIP files, as the official pair does) are
built from the shipped configs (benchmarks/_random_sdxl.py); timing does not depend on the weights' values.
Sections, in order, each time-boxed (skipped when too little of --budget is left; a failure is recorded and the
run goes on), the JSON rewritten after each to $OUT/gpu_sdxl.json and benchmarks/results/:

1. eager: `refinery serve --compile off --png-level 6` (today's path exactly), pinned A+R. Its first start
   registers (hashes) both models. Per-image time of 1-image and 4-image requests (PNG included), the server's
   per-stage timings (device time, from CUDA events), and 8 clients one after another against the same 8 at
   once (each its own batch, as with --max-batch 1), alternating, with the device's busy share.
2. tuned start: `refinery serve` with the defaults (compile, fused QKV, channels-last, bfloat16 VAE, PNG level
   1), A+R pinned and already registered, their files first dropped from the page cache (as on a fresh node):
   process start to SERVING, and the first request right after (eager, while the UNets compile).
3. VAE: one latent decoded in float32, bfloat16 and float16: pixel differences and decode times.
4. compile: until the tuned service's pinned shapes are compiled (cold caches); what each took.
5. tuned: the measurements of 1, and py-spy on the server during a burst (where py-spy is installed).
6. hand-run: diffusers by hand with the same tuning (compiled from the service's caches), alternating with the
   tuned service at batch 1 and 4: the service's cost over it.
7. profile: one hand-run request under the torch profiler: device time per UNet / VAE / text encoder and the
   device's busy share.
8. FP8: the hand-run UNets' linear layers in FP8 against float16, same seed (needs torchao and FP8 hardware).
9. restart: the tuned service again, caches warm: SERVING, and until its shapes are compiled (from disk).
10. loras eager, loras tuned (issue 17): random rank-32 LoRAs in the PEFT format on the UNets' attention
   projections (to_q, to_k, to_v, to_out.0; three for A, one for R, two more for a first use), local files the
   server may read (--local-models); on the eager service and on the tuned one with --fuse-qkv off (fused
   projections refuse LoRAs), the earlier services stopped: benchmarks/bench_loras.py's a and b, interleaved
   with the no-LoRA request. `--only loras` runs these alone (with building A and R).
11. images eager, images tuned (issue 18): benchmarks/bench_image_inputs.py's a and b at full size, the earlier
   services stopped: img2img at strength 0.5 against text-to-image with the same steps (goal <= 0.6x), inpainting
   (a mask repainting the centre quarter) against img2img, without and with the refiner, interleaved; the input
   a noise PNG uploaded once (UploadImage, 64 KiB messages). `--only images` runs these alone.
12. continuous, continuous tuned (issue 19; benchmarks/_continuous_gpu.py): static against continuous batching,
   both `--compile off`, under Poisson arrivals at 80 and 100 % of the static capacity (mixed steps and refiner
   starts, --continuous-requests per load), then the compiled static service at 80 % as the reference.
   `--only continuous` runs these alone (about 18 minutes at the default 40 requests; budget 1200 s).
Every per-image figure is also given as a multiple of the 0.42 s arithmetic floor (full size only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _continuous_gpu, _image_inputs, _loras, _phases, _quality
from benchmarks._direct import Direct
from benchmarks._profile import device_profile
from benchmarks._quick import parse_args
from benchmarks._random_sdxl import write_random_sdxl
from benchmarks._report import FLOOR_S, Report
from benchmarks._service import Service, log
from server.core.settings import Speed, Toggle
from server.generation.compiling import configure_cache
from server.generation.tuning import Tuning, tuning_for

EAGER = ["--compile", "off", "--png-level", "6"]
# What "auto" turns on for CUDA, spelled out so that the CPU smoke run takes the same path (with --cpu-compile).
TUNED_ON_CPU = ["--fuse-qkv", "on", "--channels-last", "on", "--vae-decode", "bfloat16"]


def build_pair(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """A and R: random full-size weights, or copies of the tiny built-in pair with --smoke."""
    started = time.perf_counter()
    if args.smoke:
        from modelstore import ModelStore, StoreSettings

        store = ModelStore(StoreSettings(cache_dir=root / "tiny-cache"))
        folders = {}
        for name, air in (("A", "builtin:tiny-sdxl-base@1"), ("R", "builtin:tiny-sdxl-refiner@1")):
            folders[name] = root / name
            shutil.copytree(store.resolve(air).path, folders[name], symlinks=False)
        return folders
    a = write_random_sdxl(root / "A", refiner=False, seed=1, device=args.device)
    folders = {"A": a, "R": write_random_sdxl(root / "R", refiner=True, seed=2, device=args.device, share_from=a)}
    log(f"built A and R in {time.perf_counter() - started:.1f}s")
    return folders


def evict_page_cache(folders: dict[str, Path]) -> int:
    """Drop the models' files from the page cache (no root needed); returns how many files."""
    files = [f for folder in folders.values() for f in folder.rglob("*.safetensors")]
    for path in files:
        with path.open("rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return len(files)


class Run:
    """One benchmark run: its settings, its report, the services it started (closed at the end, or by the
    watchdog when the run outlives its budget)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refinery-gpu-bench-"))
        name, folder = "gpu_sdxl" + ("_smoke" if args.smoke else ""), self.workdir if args.quick else None
        self.report = Report(name, budget_s=args.budget, floor_s=args.floor, folder=folder)
        self.cache = self.workdir / "cache"
        self.compile_cache = self.workdir / "compile"
        self.services: list[Service] = []
        self.folders: dict[str, Path] = {}
        self.direct: Direct | None = None

    def service(self, flags: list[str]) -> Service:
        pins = ["--pin", f"local:{self.folders['A']}+local:{self.folders['R']}", "--max-batch", "4"]
        service = Service(self.folders, self.args.device, self.cache, [*pins, *flags])
        self.services.append(service)
        return service

    def tuned_flags(self) -> list[str]:
        tuned = ["--compile-cache", str(self.compile_cache)]
        if self.args.device.startswith("cuda"):
            return tuned
        return [*tuned, "--compile", self.args.cpu_compile, *TUNED_ON_CPU]

    def tuning(self) -> Tuning:
        if self.args.device.startswith("cuda"):
            return tuning_for(Speed(), self.args.device)
        on, mode = Toggle.ON, self.args.cpu_compile
        return tuning_for(Speed(compile=mode, fuse_qkv=on, channels_last=on, vae_decode="bfloat16"), "cpu")

    def compiles(self) -> bool:
        """Whether the tuned runs compile their UNets (so there are compiled shapes to wait for)."""
        return self.args.device.startswith("cuda") or self.args.cpu_compile != "off"

    def stop(self, service: Service) -> None:
        service.close()
        self.services.remove(service)
        if self.args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def close(self) -> None:
        for service in list(self.services):
            service.close()
        if self.direct is not None:
            self.direct.close()


def eager_phase(run: Run) -> None:
    report, args = run.report, run.args
    with report.section("eager", needs_s=args.needs_s * 3) as go:
        if go:
            eager = _phases.start(report, "eager", lambda: run.service(EAGER), args)
            _phases.latency(report, "eager", eager, args)
            _phases.concurrency(report, "eager", eager, args)
            run.stop(eager)


def tuned_phase(run: Run) -> Service | None:
    report, args = run.report, run.args
    tuned = None
    with report.section("tuned start", needs_s=args.needs_s) as go:
        if go:
            # As on a node that never read the weights: the start reads them from disk (while it imports).
            report.put(tuned_start_weights_evicted_from_page_cache=evict_page_cache(run.folders))
            tuned = _phases.start(report, "tuned", lambda: run.service(run.tuned_flags()), args)
    with report.section("vae", needs_s=args.needs_s / 2) as go:
        if go:
            report.put(vae=_quality.vae_decode_difference(run.folders["A"], args.device, args.size))
    if tuned is None:
        return None
    with report.section("compile", needs_s=args.needs_s) as go:
        if go and run.compiles():
            deadline = time.monotonic() + report.left_s() - args.needs_s * 3
            report.put(tuned_compiled=tuned.wait_compiled(deadline))
    with report.section("tuned", needs_s=args.needs_s * 2) as go:
        if go:
            _phases.latency(report, "tuned", tuned, args)
            _phases.concurrency(report, "tuned", tuned, args)
            if args.py_spy_s:
                _phases.threads_under_load(report, "tuned", tuned, args)
    return tuned


def hand_run_phase(run: Run, tuned: Service | None) -> None:
    report, args = run.report, run.args
    with report.section("hand-run", needs_s=args.needs_s * 2) as go:
        if go:
            from torch._dynamo.utils import counters

            configure_cache(run.compile_cache)
            run.direct = Direct(run.folders, args.device, tuning=run.tuning(), max_images=4)
            started = time.monotonic()
            compiled = run.direct.compile(max(10.0, report.left_s() - args.needs_s * 2))
            report.put(
                direct_compiled=compiled,
                direct_compile_s=round(time.monotonic() - started, 1),
                # Whether the hand-run found the service's compiled code in the shared caches.
                direct_compile_cache={k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
            )
            if tuned is not None and compiled:  # else the comparison would be against an eager hand-run
                _phases.service_vs_direct(report, tuned, run.direct, args)
    if run.direct is None:
        return
    with report.section("profile", needs_s=args.needs_s / 2) as go:
        if go:
            report.put(profile=device_profile(run.direct, args.size, args.steps, args.base_steps))
    with report.section("fp8", needs_s=args.needs_s / 2) as go:
        if go:
            tuning_for(Speed(fp8=True), args.device)  # refuses in one line where FP8 cannot run
            report.put(fp8=_quality.fp8_difference(run.direct, args.size, args.steps, args.base_steps))


def restart_phase(run: Run, tuned: Service | None) -> None:
    report, args = run.report, run.args
    if tuned is not None:
        run.stop(tuned)
    with report.section("restart", needs_s=args.needs_s) as go:
        if go:
            again = _phases.start(report, "restart", lambda: run.service(run.tuned_flags()), args)
            started = time.monotonic()
            if run.compiles():
                report.put(restart_compiled=again.wait_compiled(time.monotonic() + report.left_s() - 5))
                report.put(restart_compiled_after_s=round(time.monotonic() - started, 1))


def lora_phase(run: Run) -> None:
    report, args = run.report, run.args
    for service in list(run.services):  # this section's servers alone on the device
        run.stop(service)
    folder = run.workdir / "loras"
    files: dict[str, list[Path]] = {}
    for prefix in ("eager", "tuned"):
        with report.section(f"loras {prefix}", needs_s=args.needs_s * 4) as go:
            if not go:
                continue
            files = files or _loras.write_loras(run.folders, folder, rank=32, cold=2)
            flags = EAGER if prefix == "eager" else run.tuned_flags()
            if "--fuse-qkv" in flags:  # the tuned CPU flags fuse QKV, which refuses LoRAs: off in this section only
                flags = [*flags[: flags.index("--fuse-qkv")], *flags[flags.index("--fuse-qkv") + 2 :]]
            service = run.service(
                [*flags, "--fuse-qkv", "off", "--local-models", str(folder), "--trust-loopback-admin"]
            )
            for path in (p for paths in files.values() for p in paths):
                service.pull(f"local:{path}")  # registered (hashed) beforehand, as an operator would
            if prefix == "tuned" and run.compiles():
                report.put(
                    loras_tuned_compiled=service.wait_compiled(time.monotonic() + report.left_s() - args.needs_s * 3)
                )
            checks, measure = _loras.Checks(), argparse.Namespace(**{**vars(args), "warmup": 1})
            base, refiner = [f"local:{p}" for p in files["base"]], f"local:{files['refiner'][0]}"
            figures = _loras.steady_and_switching(service, base, refiner, measure, checks)
            figures["cold"] = _loras.cold_figures(service, files["cold"], measure, checks)
            # Random fp16 weights may give NaN (black) images alike for every LoRA set: problems, not a failure.
            report.put(**{f"loras_{prefix}": {**figures, "problems": checks.problems}})
            log(f"loras {prefix}: {_loras.summary(figures)}; problems: {checks.problems or 'none'}")
            run.stop(service)


def images_phase(run: Run) -> None:
    report, args = run.report, run.args
    for service in list(run.services):  # this section's servers alone on the device
        run.stop(service)
    for prefix in ("eager", "tuned"):
        with report.section(f"images {prefix}", needs_s=args.needs_s * 4) as go:
            if not go:
                continue
            service = run.service(EAGER if prefix == "eager" else run.tuned_flags())
            if prefix == "tuned" and run.compiles():
                deadline = time.monotonic() + report.left_s() - args.needs_s * 3
                report.put(images_tuned_compiled=service.wait_compiled(deadline))
            measure = argparse.Namespace(**{**vars(args), "warmup": 1, "strength": 0.5, "inpaint_model": ""})
            figures = _image_inputs.modes(service, measure)
            # Random fp16 weights may give NaN (black) images alike for every mode: problems, not a failure.
            report.put(**{f"images_{prefix}": figures})
            log(f"images {prefix}: {figures['ratios']}; problems: {figures['problems'] or 'none'}")
            run.stop(service)


def main() -> None:
    args = _arguments()
    run = Run(args)
    run.report.put(
        device=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        torch=torch.__version__, size=args.size, steps=args.steps, base_steps=args.base_steps, floor_s=args.floor,
    )  # fmt: skip
    watchdog = threading.Timer(args.budget + args.grace, _overtime, (run,))
    watchdog.daemon = True
    watchdog.start()
    try:
        run.folders = build_pair(run.workdir / "models", args)
        if args.only is None:
            eager_phase(run)
            tuned = tuned_phase(run)
            hand_run_phase(run, tuned)
            restart_phase(run, tuned)
        if args.only in (None, "loras"):
            lora_phase(run)
        if args.only in (None, "images"):
            images_phase(run)
        if args.only in (None, "continuous"):
            _continuous_gpu.phase(run)
    finally:
        run.close()
        watchdog.cancel()
        run.report.write()
    _print(run.report.figures)
    if args.quick:
        _quick_verdict(run)


def _quick_verdict(run: Run) -> None:
    """A quick run fails when a section did; it leaves no files behind."""
    failed = run.report.failed()
    if not run.args.device.startswith("cuda"):
        failed = [name for name in failed if name != "fp8"]  # FP8 refuses a CPU by design
    if run.args.workdir is None:
        shutil.rmtree(run.workdir, ignore_errors=True)
    if failed:
        sys.exit(f"gpu_sdxl --quick: sections failed: {', '.join(failed)}")


def _overtime(run: Run) -> None:
    """The run outlived its budget and grace: keep what was measured, stop everything."""
    log("over time: writing what was measured and stopping")
    run.report.put(overtime=True)
    for service in list(run.services):
        service.process.kill()
    os._exit(3)


def _print(figures: dict[str, Any]) -> None:
    print()
    for key, value in figures.items():
        if key != "sections" and not isinstance(value, dict | list):
            print(f"  {key:<52} {value}")
    for name, record in figures["sections"].items():
        print(f"  section {name:<44} {record}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, small shapes, CPU: a dry run")
    parser.add_argument("--device", default=None, help="default cuda:0 (cpu with --smoke)")
    parser.add_argument("--size", type=int, default=None, help="default 1024 (64 with --smoke)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=None, help="timed requests per figure (default 3; 2 smoke)")
    parser.add_argument("--rounds", type=int, default=1, help="sequential/concurrent rounds")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds (default 450; 1200 --only continuous; 1500 smoke)"
    )
    parser.add_argument("--grace", type=float, default=60.0, help="then the watchdog stops it")
    parser.add_argument("--cpu-compile", default="default", help="torch.compile mode of the tuned CPU runs (off: none)")
    parser.add_argument("--py-spy-s", type=float, default=6.0, help="py-spy sampling of the tuned server (0: off)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--continuous-requests", type=int, default=40, help="requests per load and server (issue 19)")
    only = ["loras", "images", "continuous"]
    parser.add_argument("--only", choices=only, default=None, help="only these sections (and building A and R)")
    quick = {"smoke": True, "steps": 10, "reps": 1, "concurrent": 2, "py_spy_s": 0.0, "cpu_compile": "off",
             "continuous_requests": 4}  # fmt: skip
    args = parse_args(parser, quick)
    args.device = args.device or ("cpu" if args.smoke else "cuda:0")
    args.size = args.size or (64 if args.smoke else 1024)
    args.reps = args.reps or (2 if args.smoke else 3)
    args.budget = args.budget or (1500.0 if args.smoke else 1200.0 if args.only == "continuous" else 450.0)
    args.base_steps = min(max((2 * args.steps * 90 + 100) // 200, 1), args.steps - 1)  # the contract's 90 %
    full = args.size == 1024 and args.steps == 30 and not args.smoke
    args.floor = FLOOR_S if full else None
    args.needs_s = 8.0 if args.smoke else 25.0  # the rough cost of one measured step of a section
    return args


if __name__ == "__main__":
    main()
