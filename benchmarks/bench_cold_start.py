"""Cold start on the CPU with the tiny pair: process start to SERVING with a pinned pair already in the cache,
and the first request after it; where the time goes (importing the server, loading the pair).

    .venv/bin/python benchmarks/bench_cold_start.py --starts 5
    .venv/bin/python benchmarks/bench_cold_start.py --quick       # one cached start: a check that it runs

The pair is a local copy of the tiny built-in models (local models are what a first start must register: read
and hash). The first start registers it and is reported apart; the next `--starts` find it cached, as a
restarted replica does. Beside each start: importing `server.app` in a fresh interpreter (torch, diffusers,
transformers, grpc), and the pair's load as the server logs it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from benchmarks._service import ROOT, Service, log
from benchmarks.gpu_sdxl import build_pair


def import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import server.app"], cwd=ROOT, check=True)
    return time.perf_counter() - started


def start(folders: dict[str, Path], cache: Path) -> dict[str, float]:
    service = Service(folders, "cpu", cache, ["--pin", f"local:{folders['A']}+local:{folders['R']}"])
    try:
        first = service.generate(64, 20)
        load = [
            float(m.group(1))
            for text in _messages(service.log_path)
            if (m := re.search(r"^device cpu: loaded .* in ([0-9.]+)s\)", text))
        ]
    finally:
        service.close()
    return {"serving_s": service.ready_s, "first_request_s": first, "pair_load_s": sum(load)}


def _messages(log_path: Path) -> list[str]:
    """The server's log messages; the log file also holds what the libraries print to stderr (not JSON)."""
    entries = []
    for line in log_path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return [str(e.get("message", "")) for e in entries if isinstance(e, dict)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    args = parse_args(parser, {"starts": 1})
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_pair(Path(tmp) / "models", argparse.Namespace(smoke=True))
        cache = Path(tmp) / "cache"
        registering = start(folders, cache)
        log(f"first start (registers the pair): {registering}")
        runs = []
        for _ in range(args.starts):
            runs.append({"import_s": import_seconds(), **start(folders, cache)})
            log(f"cached start: {runs[-1]}")
    medians = {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
    print(json.dumps({"first_start": registering, "cached_start_medians": medians, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
