"""Warm pods (issue 20): a new replica's start to SERVING from the shared read-only model cache, against a cold
one with an empty cache of its own (an emptyDir), interleaved, on the CPU with the tiny pair pinned.

    .venv/bin/python benchmarks/bench_warm_pod.py --starts 5
    .venv/bin/python benchmarks/bench_warm_pod.py --quick       # one of each: a check that it runs

The shared cache is filled once, as the pull Job fills the volume (`ModelStore.pull` + `components` of the
pair). A cold start does what a pod with an emptyDir does before it can serve: fetch the pair (the built-in
models are "downloaded" by building them: weights generated, hashed, verified, committed), measure it, load it.
A warm start opens the volume read-only (`--cache-read-only`, bind-mounted read-only where the machine allows:
deploy/local/read_only.py), checks each file's fast digest, and loads. Runs alternate cold, warm, cold, ... so
a load on the machine affects both alike. Each start is a `deploy/local` replica, timed from process start to
the readiness check's SERVING; the log's model lines say where the time went.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from benchmarks._service import log
from deploy.local import read_only
from deploy.local.fleet import free_ports
from deploy.local.replica import Replica, ReplicaSpec
from modelstore import ModelStore, StoreSettings

PAIR = ("builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-refiner@1")


def fill(cache: Path) -> None:
    store = ModelStore(StoreSettings(cache_dir=cache))
    try:
        for model in PAIR:
            store.components(store.pull(model))
    finally:
        store.close()


def start(name: str, cache: Path, run_dir: Path, *, warm: bool) -> dict[str, float]:
    port, metrics_port = free_ports("127.0.0.1", 2)
    prefix = read_only.read_only_prefix(cache) if warm and read_only.available() else ()
    spec = ReplicaSpec(
        name, "127.0.0.1", port, metrics_port, cache, run_dir / f"{name}.log", pins="+".join(PAIR),
        cache_read_only=warm, prefix=prefix, env={"REFINERY_DRAIN_DELAY": "0"},
    )  # fmt: skip
    replica = Replica(spec)
    started = time.perf_counter()
    replica.start()
    try:
        replica.wait_ready(300)
        serving = time.perf_counter() - started
        downloads = replica.total("refinery_downloads_total")
    finally:
        replica.stop()
    built = spec.log_path.read_text().count("cached builtin")
    return {"serving_s": round(serving, 3), "downloads": downloads, "models_built": built}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="starts of each kind, interleaved")
    args = parse_args(parser, {"starts": 1})
    with tempfile.TemporaryDirectory(prefix="bench-warm-pod-") as tmp:
        root = Path(tmp)
        shared = root / "shared"
        fill(shared)
        runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
        for i in range(args.starts):
            cold_cache = root / f"cold-{i}"
            runs["cold"].append(start(f"cold-{i}", cold_cache, root, warm=False))
            shutil.rmtree(cold_cache, ignore_errors=True)
            log(f"cold start {i}: {runs['cold'][-1]}")
            runs["warm"].append(start(f"warm-{i}", shared, root, warm=True))
            log(f"warm start {i}: {runs['warm'][-1]}")
    medians = {kind: round(statistics.median(r["serving_s"] for r in rs), 3) for kind, rs in runs.items()}
    summary = {
        "start_to_serving_median_s": medians,
        "read_only_mount": read_only.available(),
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
