"""Cold start on the CPU, today's code against the one-pass start (issue 19), in one run: process start to
SERVING with the pinned models already in the cache, and how many bytes of each cached model the server reads
to get there.

    .venv/bin/python benchmarks/bench_cold_start.py --starts 5      # the tiny pair and a 1 GB base
    .venv/bin/python benchmarks/bench_cold_start.py --quick         # one start each: a check that it runs

"before" is `refinery serve` from a `git worktree` of `--before` (default: the commit before the one that made
the start read each file once), "after" this checkout's; the same cache, the same pins, started alternately
(the order swapped every round), each from a page cache without the models' files (`--drop files`: each blob
dropped with `posix_fadvise(DONTNEED)`, no root needed; `--drop all`: `echo 3 > /proc/sys/vm/drop_caches`,
which also drops torch's libraries, whose reads then swamp the models'). The models are cached as downloads
are (blobs with their fast digests): the built-in tiny pair, and with `--wide-mb` an SDXL-shaped base whose
UNet is widened to about that size (the tiny pair's encoders and VAE), pinned alone.

Bytes read, per model: one extra start of each side under `strace` (skipped without it) counts what every
read()/pread() of the process returned for each of the model's files, and what it mapped (safetensors maps a
file and copies every tensor out of the mapping: a second pass over the bytes that read() does not show).
Beside each timed start: `read_bytes` of the server's /proc/PID/io at SERVING (what it fetched from storage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks._quick import parse_args
from benchmarks._service import ROOT, free_port, log

TINY_BASE, TINY_REFINER = "builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-refiner@1"
WIDE = "builtin:bench-sdxl-wide@1"  # kept in the bench's own cache only: nothing can fetch it
ONE_PASS = "modelstore/_tensor_file.py"  # the file the one-pass start added
READY = "refinery.v1.GenerationService"
_TRACED = "trace=read,pread64,readv,preadv,mmap"
_READ = re.compile(r"^\d+\s+(?:read|pread64|readv|preadv)\(\d+<(?P<path>[^>]*)>.*\) = (?P<n>\d+)$")
_MMAP = re.compile(r"^\d+\s+mmap\([^,]*, (?P<n>\d+), [^,]*, [^,]*, \d+<(?P<path>[^>]*)>")


@dataclass
class Side:
    name: str
    root: Path  # the checkout whose `refinery serve` runs
    ready_s: list[float] = field(default_factory=list)
    storage_mb: list[float] = field(default_factory=list)
    reads: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> read/mapped ratios


def before_commit(rev: str) -> str | None:
    """The commit `--before` names (auto: the parent of the one that added the one-pass reader); None without
    git history (a shallow clone) or with `--before none`."""
    if rev == "none":
        return None
    if rev == "auto":
        added = _git("log", "--diff-filter=A", "--format=%H", "--", ONE_PASS).split()
        if not added:
            return None
        rev = f"{added[-1]}^"
    try:
        return _git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    except subprocess.CalledProcessError:
        return None


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def worktree(commit: str, parent: Path) -> Iterator[Path]:
    path = parent / f"before-{commit[:10]}"
    _git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        _git("worktree", "remove", "--force", str(path))


def build_cache(cache: Path, wide_mb: int) -> dict[str, dict[str, Path]]:
    """The tiny pair (and the wide base) cached as a download is; each model's files (path in its folder ->
    the blob file it is)."""
    from modelstore import ModelStore, StoreSettings

    store = ModelStore(StoreSettings(cache_dir=cache))
    try:
        airs = [TINY_BASE, TINY_REFINER]
        for air in airs:
            store.resolve(air)
        if wide_mb:
            _keep_wide(cache, wide_mb)
            airs.append(WIDE)
        folders = {air: store.describe(air).path for air in airs}
        return {
            air: {str(p.relative_to(f)): p.resolve() for p in f.rglob("*") if p.is_file()} for air, f in folders.items()
        }
    finally:
        store.close()


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p.resolve() for p in sorted(folder.rglob("*")) if p.is_file()}


def _keep_wide(cache: Path, mb: int) -> None:
    from modelstore._architecture import identify_folder
    from modelstore._builtin import BUILTIN_MODELS, build, keep
    from modelstore._cache import Cache
    from modelstore.air import parse_air
    from modelstore.record import Layout

    def write(folder: Path) -> None:
        build(BUILTIN_MODELS[TINY_BASE], folder)
        _widen_unet(folder / "unet", mb)

    started = time.perf_counter()
    store = Cache(cache, 0)
    try:
        metadata = {"source": "builtin", "name": "bench-sdxl-wide", "version": "1"}
        keep(
            parse_air(WIDE),
            store,
            lambda _: False,
            write,
            layout=Layout.DIFFUSERS,
            metadata=metadata,
            detect=identify_folder,
        )
    finally:
        store.close()
    log(f"cached {WIDE} ({mb} MB asked) in {time.perf_counter() - started:.1f}s")


def _widen_unet(folder: Path, mb: int) -> None:
    """Replace the tiny UNet with one of the same structure whose blocks are wide enough for about `mb` MB of
    weights (random: time does not depend on the values). In fp32, the dtype the CPU runs in: a load then
    casts nothing, as a GPU loading fp16 files does not, and what is left is reading (the fp16 -> fp32 cast
    would otherwise be most of a CPU load, the same on both sides)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    width = max(64, round(512 * (mb / 1900) ** 0.5 / 64) * 64)  # (512, 1024), 2 transformer layers: 1.9 GB
    config.update(block_out_channels=[width, 2 * width], transformer_layers_per_block=[2, 2], attention_head_dim=8)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with init_empty_weights():
        shapes = {k: v.shape for k, v in UNet2DConditionModel.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(19)
    weights = {k: torch.randn(s, generator=generator, dtype=torch.float32) * 0.02 for k, s in shapes.items()}
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def drop_page_cache(blobs: list[Path], how: str) -> None:
    if how == "all":
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for path in blobs:
        with path.open("rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def serve(side: Side, cache: Path, pins: list[str], trace: Path | None = None) -> tuple[float, float]:
    """Start `side`'s server on `cache` pinning `pins`; (seconds to SERVING, MB read from storage by then).
    Under `strace` with `trace` (the storage figure is then the tracer's: NaN)."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--devices", "cpu", "--model", TINY_BASE, "--refiner", TINY_REFINER, "--cache-dir", str(cache)]
    command += ["--log-level", "INFO", "--log-json", "--grace", "1", *(f"--pin={pin}" for pin in pins)]
    if trace is not None:
        command = [
            "strace",
            "-f",
            "-qq",
            "-y",
            "-s",
            "0",
            "-e",
            "trace=read,pread64,readv,preadv,mmap",
            "-o",
            str(trace),
            *command,
        ]
    # The side's own packages first (the server and the client package its protos come from).
    env = {**os.environ, "REFINERY_OFFLINE": "1", "PYTHONPATH": f"{side.root}:{side.root}/clients/python/src"}
    log_path = cache.parent / f"serve-{side.name}-{port}.log"
    started = time.perf_counter()
    with log_path.open("w") as out:
        process = subprocess.Popen(command, cwd=side.root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_serving(process, port, log_path)
        ready_s = time.perf_counter() - started
        storage = float("nan") if trace is not None else _read_bytes(process.pid) / 1e6
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return ready_s, storage


def _wait_serving(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=READY)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"refinery serve exited:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(grpc.RpcError):
                if health.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.02)


def _read_bytes(pid: int) -> int:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["read_bytes"])


def bytes_per_model(trace: Path, models: dict[str, dict[str, Path]]) -> dict[str, dict[str, float]]:
    """For each model: its weight files' size (MB), what the traced process read() and mapped of them in times
    that size, and the MB it read of its other files (configs, tokenizers: every pipeline's tokenizer load
    reads its vocabulary again). A file two models share counts for both: it is part of each."""
    read: Counter[str] = Counter()
    mapped: Counter[str] = Counter()
    for line in trace.read_text(errors="replace").splitlines():
        if "/blobs/" not in line:
            continue
        if m := _READ.match(line):
            read[m["path"]] += int(m["n"])
        elif m := _MMAP.match(line):
            mapped[m["path"]] += int(m["n"])
    result = {}
    for air, files in models.items():
        weights = {str(b) for relative, b in files.items() if relative.endswith(".safetensors")}
        others = {str(b) for b in files.values()} - weights
        size = sum(Path(b).stat().st_size for b in weights)
        result[air] = {
            "weights_mb": round(size / 1e6, 1),
            "weights_read_x": round(sum(read[b] for b in weights) / size, 3),
            "weights_mapped_x": round(sum(mapped[b] for b in weights) / size, 3),
            "other_files_mb": round(sum(Path(b).stat().st_size for b in others) / 1e6, 2),
            "other_files_read_mb": round(sum(read[b] for b in others) / 1e6, 2),
        }
    return result


def run(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    cache = tmp / "cache"
    models = build_cache(cache, args.wide_mb)
    pins = [f"{TINY_BASE}+{TINY_REFINER}"] + ([WIDE] if args.wide_mb else [])
    blobs = sorted({b for files in models.values() for b in files.values()})
    commit = before_commit(args.before)
    with contextlib.ExitStack() as stack:
        sides = [Side("after", ROOT)]
        if commit is None:
            log("no earlier commit to compare with (--before none, or no git history): this checkout only")
        else:
            sides.insert(0, Side("before", stack.enter_context(worktree(commit, tmp))))
        for side in sides:  # components measured, libraries in the page cache: what a restarted replica finds
            serve(side, cache, pins)
        for i in range(args.starts):
            for side in sides if i % 2 == 0 else sides[::-1]:
                drop_page_cache(blobs, args.drop)
                ready_s, storage_mb = serve(side, cache, pins)
                side.ready_s.append(round(ready_s, 3))
                side.storage_mb.append(round(storage_mb, 1))
                log(f"{side.name}: SERVING after {ready_s:.2f}s, {storage_mb:.0f} MB read from storage")
        if args.trace == "on" and shutil.which("strace") is None:
            log("strace is not installed: bytes per model not counted")
        elif args.trace == "on":
            for side in sides:
                drop_page_cache(blobs, args.drop)
                trace = tmp / f"trace-{side.name}"
                serve(side, cache, pins, trace)
                side.reads = bytes_per_model(trace, models)
                trace.unlink()
                log(f"{side.name}: {side.reads}")
    return {
        "before": commit,
        "drop": args.drop,
        "pins": pins,
        "sides": {
            side.name: {
                "serving_s_median": statistics.median(side.ready_s) if side.ready_s else None,
                "serving_s": side.ready_s,
                "storage_mb_median": statistics.median(side.storage_mb) if side.storage_mb else None,
                "bytes_per_model": side.reads,
            }
            for side in sides
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="timed starts of each side (default 5)")
    parser.add_argument("--wide-mb", type=int, default=1000, help="the widened base's size (0: the tiny pair only)")
    parser.add_argument("--before", default="auto", help="today's commit (auto; none: this checkout alone)")
    parser.add_argument("--drop", choices=("files", "all"), default="files", help="what leaves the page cache")
    parser.add_argument("--trace", choices=("on", "off"), default="on", help="count bytes per model with strace")
    args = parse_args(parser, {"starts": 1, "wide_mb": 20})
    with tempfile.TemporaryDirectory(prefix="refinery-cold-start-") as tmp:
        report = run(args, Path(tmp))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
