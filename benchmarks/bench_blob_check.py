"""What checking a cached blob costs: a full SHA256 against the fast digest kept since it entered the cache.

    .venv/bin/python benchmarks/bench_blob_check.py                  # a 6.9 GB file (an SDXL checkpoint's size)
    .venv/bin/python benchmarks/bench_blob_check.py --path FILE      # an existing file, e.g. a real checkpoint
    .venv/bin/python benchmarks/bench_blob_check.py --sparse         # a sparse file: no disk at all, CPU only
    .venv/bin/python benchmarks/bench_blob_check.py --quick          # 10 MB, one run: a check that it runs

Each method reads the whole file twice: "cold" after the file's pages were dropped from the page cache
(posix_fadvise DONTNEED: the read goes to the disk, or under a VM to the host's cache), and "warm" from the
page cache. CPU is the process's CPU time (all threads). Methods:

- `sha256`: hashlib.sha256 over 8 MiB reads, one thread: a plain full check;
- `blake2b`: the standard library's other fast cryptographic hash, for comparison;
- `store sha256`: `_digests.full_digests`, what `refinery models verify` does (SHA256 and XXH3-128 of each
  block, in one read);
- `store fast`: `_digests.fast_digest` (XXH3-128), what every process does before it first uses a blob.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from modelstore._digests import fast_digest, full_digests

_BLOCK = 16 << 20


class _Hash(Protocol):
    def update(self, data: memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def _plain(factory: Callable[[], _Hash]) -> Callable[[Path], str]:
    def digest(path: Path) -> str:
        h = factory()
        buffer = bytearray(8 << 20)
        view = memoryview(buffer)
        with path.open("rb", buffering=0) as f:
            while read := f.readinto(buffer):
                h.update(view[:read])
        return h.hexdigest()

    return digest


METHODS: dict[str, Callable[[Path], object]] = {
    "sha256": _plain(hashlib.sha256),
    "blake2b": _plain(hashlib.blake2b),
    "store sha256": full_digests,
    "store fast": fast_digest,
}


def make_file(path: Path, size: int, *, sparse: bool) -> None:
    with path.open("wb") as f:
        if sparse:
            f.truncate(size)
            return
        block = os.urandom(_BLOCK)  # hashing speed does not depend on the bytes; the disk must not dedupe them
        left = size
        while left:
            left -= f.write(block[: min(left, _BLOCK)])
        f.flush()
        os.fsync(f.fileno())


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(method: Callable[[Path], object], path: Path, *, cold: bool) -> tuple[float, float]:
    if cold:
        evict(path)
    else:
        method(path)  # the file is in the page cache now
    wall, cpu = time.perf_counter(), time.process_time()
    method(path)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, help="an existing file to read (default: one made for the run)")
    parser.add_argument("--size-gb", type=float, default=6.9, help="size of the file made for the run")
    parser.add_argument("--sparse", action="store_true", help="make a sparse file (measures the CPU alone)")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the file (default: the temp dir)")
    parser.add_argument("--runs", type=int, default=2, help="best of this many runs per method and state")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = parse_args(parser, {"size_gb": 0.01, "runs": 1})
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = args.path
        if path is None:
            path = Path(tmp) / "blob"
            make_file(path, int(args.size_gb * 1e9), sparse=args.sparse)
        size = path.stat().st_size
        print(f"{path}: {size / 1e9:.2f} GB, {os.cpu_count()} CPUs\n")
        print("| method | cold s | cold GB/s | warm s | warm GB/s | warm CPU s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in args.methods:
            cold = min(measure(METHODS[name], path, cold=True) for _ in range(args.runs))
            warm = min(measure(METHODS[name], path, cold=False) for _ in range(args.runs))
            print(
                f"| {name} | {cold[0]:.2f} | {size / cold[0] / 1e9:.2f} | {warm[0]:.2f} | "
                f"{size / warm[0] / 1e9:.2f} | {warm[1]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
