"""Download throughput of the model store against a plain copy of the same bytes over one loopback server.

    python benchmarks/bench_download.py [--mb 512] [--runs 3]
    python benchmarks/bench_download.py --quick        # 8 MiB, one run: a check that it runs

"store" is `ModelStore.resolve("civitai:1@2")` from an empty cache: the metadata request, the 307, streaming
to a partial file while hashing, SHA256 and size verification, the safetensors header check, fsync, the
atomic rename, the model folder and the index row. "plain copy" is a requests stream of the same URL (the
store's HTTP client, read the way the store reads it) written to a file, nothing else. The server sends with
sendfile from its own process; the best of `--runs` (by wall time) is reported, with the CPU time the client
process spent (all threads): on a machine whose cores are busy with other work, hashing's extra CPU shows as
wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loopback import LoopbackServer, write_checkpoint
from benchmarks._quick import parse_args
from modelstore import ModelStore, StoreSettings

Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process, all threads)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plain_copy(url: str, dest: Path) -> Timing:
    start, cpu = time.perf_counter(), _cpu()
    with requests.get(url, stream=True, timeout=60) as response, dest.open("wb") as out:
        # read1: each piece as the socket delivers it (up to 1 MiB), as the store reads; iter_content would
        # gather exact 1 MiB chunks, with a copy more per chunk.
        while chunk := response.raw.read1(1 << 20):
            out.write(chunk)
    return time.perf_counter() - start, _cpu() - cpu


def store_download(api: str, cache: Path) -> Timing:
    store = ModelStore(StoreSettings(cache_dir=cache, civitai_api=api))
    try:
        start, cpu = time.perf_counter(), _cpu()
        store.resolve("civitai:1@2")
        return time.perf_counter() - start, _cpu() - cpu
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parse_args(parser, {"mb": 8, "runs": 1})
    size = args.mb << 20
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        root = Path(tmp)
        source = root / "model.safetensors"
        sha256 = write_checkpoint(source, size)
        server = LoopbackServer(source, sha256)
        try:
            copies, stores = [], []
            for run in range(args.runs):
                copies.append(plain_copy(f"{server.url}/file", root / f"copy-{run}"))
                (root / f"copy-{run}").unlink()
                cache = root / f"cache-{run}"
                stores.append(store_download(server.url, cache))
                shutil.rmtree(cache)
        finally:
            server.close()
    copy, stored = min(copies), min(stores)
    copy_rate, store_rate = size / copy[0] / 1e6, size / stored[0] / 1e6
    note = f"{args.mb} MiB, best of {args.runs}, {os.cpu_count()} CPUs"
    print(f"{'':<12}{'wall s':>8}{'MB/s':>9}{'cpu s':>8}   ({note})")
    print(f"{'plain copy':<12}{copy[0]:>8.2f}{copy_rate:>9.0f}{copy[1]:>8.2f}")
    print(f"{'store':<12}{stored[0]:>8.2f}{store_rate:>9.0f}{stored[1]:>8.2f}")
    print(f"{'ratio':<12}{'':>8}{store_rate / copy_rate:>9.2f}")


if __name__ == "__main__":
    main()
