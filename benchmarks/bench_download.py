"""Download throughput of the model store against a plain copy of the same bytes over one loopback server.

    python benchmarks/bench_download.py [--mb 512] [--runs 3]

"store" is `ModelStore.resolve("civitai:1@2")` from an empty cache: the metadata request, the 307, streaming
to a partial file while hashing, SHA256 and size verification, the safetensors header check, fsync, the
atomic rename, the model folder and the index row. "plain copy" is an httpx stream of the same URL written to
a file, nothing else. The server sends with sendfile from its own process; the best of `--runs` is reported.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loopback import LoopbackServer, write_checkpoint
from modelstore import ModelStore, StoreSettings


def plain_copy(url: str, dest: Path) -> float:
    start = time.perf_counter()
    with httpx.Client() as client, client.stream("GET", url) as response, dest.open("wb") as out:
        for chunk in response.iter_bytes():
            out.write(chunk)
    return time.perf_counter() - start


def store_download(api: str, cache: Path) -> float:
    store = ModelStore(StoreSettings(cache_dir=cache, civitai_api=api))
    try:
        start = time.perf_counter()
        store.resolve("civitai:1@2")
        return time.perf_counter() - start
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
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
    copy_rate, store_rate = size / min(copies) / 1e6, size / min(stores) / 1e6
    print(f"{'':<12}{'best s':>8}{'MB/s':>9}   ({args.mb} MiB, best of {args.runs})")
    print(f"{'plain copy':<12}{min(copies):>8.2f}{copy_rate:>9.0f}")
    print(f"{'store':<12}{min(stores):>8.2f}{store_rate:>9.0f}")
    print(f"{'ratio':<12}{'':>8}{store_rate / copy_rate:>9.2f}")


if __name__ == "__main__":
    main()
