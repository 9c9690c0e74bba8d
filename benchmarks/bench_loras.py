"""What LoRAs and prompts of any length cost (issue 17), through a real `refinery serve` on loopback gRPC, on the
CPU with the tiny built-in pair and its built-in tiny LoRAs.

    python benchmarks/bench_loras.py            # 64x64, 20 steps, refiner from 90 % (18 + 2), batch 1
    python benchmarks/bench_loras.py --reps 20
    python benchmarks/bench_loras.py --quick    # 6 steps, one rep: a check that it runs; records nothing

One server (a local copy of the tiny pair pinned, `--max-batch 4`), every figure from the same run, each
comparison interleaved request by request after a warm-up, so drift in machine load hits every side alike:

a. steady state: no LoRA, one base LoRA, three base LoRAs, three base + one refiner LoRA, the adapters already
   loaded: medians and ratios against no LoRA (goal <= 1.10). Cold: the first request of a LoRA the server
   never applied (its file registered beforehand, as PullModel does: what is left is reading it and injecting
   the adapter), each followed by the same LoRA again (warm), on LoRAs written for the run (random, PEFT, the
   built-in ones' shape), plus the first request of each built-in set in the warm-up, once each.
b. switching: requests alternating between two LoRA sets (A, B, A, B, ...) against the same requests grouped
   (A, A, ..., B, B, ...): the difference per request is what a switch costs.
c. prompts: a 70-token prompt (1 window) against a 300-token one (4 windows), plain, and the 300-token one with
   compel weighting; and the API's validation (`job_from_request`, in this process) of a 4000-character compel
   prompt, once, since compel's parser is slow.
d. batching: 4 concurrent requests with the same LoRA set against 4 without LoRAs (each side sharing one
   batch), and the same 4 LoRA requests kept apart (a guidance scale each, so no two share a batch).

Every request's image is checked: the same request gives the same pixels every time, different LoRA sets give
different pixels, each image reports the LoRAs asked for, and no LoRA request loads a model of the pair again.
The figures are written to benchmarks/results/loras_cpu.json (not with --quick).
`benchmarks/gpu_sdxl.py` measures a and b with full-size SDXL on a GPU with the same functions (`_loras.py`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._loras import (
    Checks,
    Variant,
    call,
    cold_figures,
    interleaved,
    stats,
    steady_and_switching,
    write_random_lora,
)
from benchmarks._quick import parse_args
from benchmarks._report import RESULTS
from benchmarks._service import Service, free_port, log, median_timings
from refinery.v1 import generation_pb2 as pb

BASE_1, BASE_2, BASE_3 = (f"builtin:tiny-lora-base@{v}" for v in (1, 2, 3))
REFINER_1 = "builtin:tiny-lora-refiner@1"
WORDS = "red blue green house tree river cloud stone light dark small large old new warm cold".split()  # noqa: SIM905


def batching(service: Service, lora: Variant, args: argparse.Namespace, checks: Checks) -> dict[str, Any]:
    """`args.batch` concurrent requests with one LoRA set against as many without LoRAs (each side free to share
    a batch under --max-batch), and the LoRA ones kept apart (a guidance scale each); wall seconds per round,
    and how many batches the server ran for them (its metrics page)."""
    n = args.batch
    sides = {"no_lora_together": (Variant(), 0.0), "lora_together": (lora, 0.0), "lora_apart": (lora, 0.01)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    batches: dict[str, list[float]] = {name: [] for name in sides}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    with ThreadPoolExecutor(n) as pool:
        for round_ in range(args.warmup + args.reps):
            for name, (variant, step) in sides.items():
                service.timings()
                counted = batch_metrics(args.metrics_port)
                started = time.perf_counter()
                cfgs = [7 + i * step for i in range(n)]
                calls = list(pool.map(lambda cfg, v=variant: call(service, v, args.size, args.steps, cfg=cfg), cfgs))
                wall = time.perf_counter() - started
                after = batch_metrics(args.metrics_port)
                if round_ >= args.warmup:
                    times[name].append(wall)
                    batches[name].append(after[1] - counted[1])
                    stages[name] += service.timings()
                if not step:
                    for got in calls:
                        checks.see(f"batch {name}", variant, got, batched=True)
    base = statistics.median(times["no_lora_together"])
    return {
        name: {
            **stats(times[name]),
            "ratio_to_no_lora_together": round(statistics.median(times[name]) / base, 3),
            "batches_per_round": batches[name],
            "server_stages_s": median_timings(stages[name]),
        }
        for name in sides
    }


def batch_metrics(port: int) -> tuple[float, float]:
    """(images, batches) the server has denoised so far: its `refinery_batch_images` histogram. (Of n requests
    sent at once, the first usually starts alone and the rest share the next batch.)"""
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    found = dict.fromkeys(("refinery_batch_images_sum", "refinery_batch_images_count"), 0.0)
    for line in page.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found["refinery_batch_images_sum"], found["refinery_batch_images_count"]


def prompt_of(tokens: int) -> str:
    """A plain prompt of exactly `tokens` CLIP tokens (one word, one token)."""
    from server.core.domain import PromptWeighting
    from server.core.prompt_tokens import count_tokens

    text = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))
    counted = count_tokens(text, PromptWeighting.NONE)
    assert counted == tokens, f"prompt of {counted} tokens, wanted {tokens}"
    return text


def validation_seconds(chars: int) -> dict[str, Any]:
    """The API's own validation (`job_from_request`, as the server runs it) of a compel prompt of `chars`
    characters, once, after the parser has read a short prompt."""
    from modelstore import parse_air
    from server.api.validation import job_from_request
    from server.core.errors import InvalidRequest
    from server.core.settings import DEFAULT_BASE, DEFAULT_REFINER, Limits

    unit = "(beautiful landscape)1.1, "  # 4000 characters of it: 461 tokens, within the 600 allowed
    text = (unit * (chars // len(unit) + 1))[:chars].rstrip(" ,")

    def validate(prompt: str) -> tuple[float, str]:
        request = Variant(prompt=prompt, weighting=pb.PROMPT_WEIGHTING_COMPEL).request(64, 20)
        started = time.perf_counter()
        try:
            job_from_request(request, limits=Limits(), default_model=parse_air(DEFAULT_BASE),
                             default_refiner=parse_air(DEFAULT_REFINER))  # fmt: skip
            outcome = "accepted"
        except InvalidRequest as refused:
            outcome = f"refused: {refused}"[:300]
        return time.perf_counter() - started, outcome

    validate(unit)
    seconds, outcome = validate(text)
    return {"chars": len(text), "seconds": round(seconds, 4), "outcome": outcome}


def tiny_pair(root: Path) -> dict[str, Path]:
    """Local copies of the tiny built-in pair (as `gpu_sdxl.py --smoke` serves them)."""
    from modelstore import ModelStore, StoreSettings

    store = ModelStore(StoreSettings(cache_dir=root / "tiny-cache"))
    folders = {}
    for name, air in (("A", "builtin:tiny-sdxl-base@1"), ("R", "builtin:tiny-sdxl-refiner@1")):
        folders[name] = root / name
        shutil.copytree(store.resolve(air).path, folders[name], symlinks=False)
    return folders


def measure(service: Service, cold_paths: Sequence[Path], args: argparse.Namespace) -> dict[str, Any]:
    checks = Checks()
    figures = steady_and_switching(service, (BASE_1, BASE_2, BASE_3), REFINER_1, args, checks)
    log("c: prompts, interleaved")
    prompts = {
        "prompt_70_tokens": Variant(prompt=prompt_of(70)),
        "prompt_300_tokens": Variant(prompt=prompt_of(300)),
        "prompt_300_tokens_compel": Variant(prompt=prompt_of(300), weighting=pb.PROMPT_WEIGHTING_COMPEL),
    }
    figures["prompts"] = interleaved(service, prompts, args, checks, baseline="prompt_70_tokens")
    figures["prompts"]["tokens_read"] = {
        name: call(service, variant, args.size, args.steps).tokens for name, variant in prompts.items()
    }
    # Compel reads a prompt without weighting syntax as plain text does: the same conditioning, the same image.
    figures["prompts"]["compel_image_equals_plain"] = checks.same(
        prompts["prompt_300_tokens"], prompts["prompt_300_tokens_compel"]
    )
    figures["validation_4000_chars_compel"] = validation_seconds(4000)
    log(f"d: {args.batch} concurrent requests")
    three = ((BASE_1, 1.0), (BASE_2, 0.8), (BASE_3, 0.6))
    figures["batching"] = batching(service, Variant(base=three), args, checks)
    figures["cold"] = cold_figures(service, cold_paths, args, checks)  # last: it adds adapters, LRU evicts
    figures["problems"] = checks.problems
    return figures


def first_requests(figures: dict[str, Any]) -> str:
    return ", ".join(f"{name} {row['first_request_s'] * 1000:.0f} ms" for name, row in figures.items())


def report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{args.size}x{args.size}, {args.steps} steps, refiner from 90 %, Euler, cfg 7, batch 1; CPU, tiny pair; "
        f"{args.reps} interleaved runs each after {args.warmup} warm-up round(s)"
    )
    print(f"{'':<52} {'median ms':>9} {'min ms':>9} {'ratio':>7}")
    for section, baseline in (("steady", "no_lora"), ("prompts", "prompt_70_tokens")):
        for name, row in figures[section].items():
            if isinstance(row, dict) and "median_s" in row:
                ratio = row[f"ratio_to_{baseline}"]
                print(f"{name:<52} {row['median_s'] * 1000:>9.1f} {row['min_s'] * 1000:>9.1f} {ratio:>7.3f}")
    sw = figures["switching"]
    for name in ("alternating", "grouped"):
        print(f"{'switching: ' + name + ' (per request)':<52} {sw[name]['median_s'] * 1000:>9.1f} "
              f"{sw[name]['min_s'] * 1000:>9.1f}")  # fmt: skip
    print(f"  a switch costs {sw['switch_cost_s'] * 1000:.1f} ms (ratio {sw['ratio_alternating_to_grouped']})")
    for name, row in figures["batching"].items():
        label = f"{args.batch} at once, {name} (wall; {statistics.median(row['batches_per_round']):g} batches)"
        ratio = row["ratio_to_no_lora_together"]
        print(f"{label:<52} {row['median_s'] * 1000:>9.1f} {row['min_s'] * 1000:>9.1f} {ratio:>7.3f}")
    cold_ = figures["cold"]
    print(f"{'cold: first request of a new LoRA':<52} {cold_['first_request']['median_s'] * 1000:>9.1f}")
    print(f"{'cold: the same LoRA again':<52} {cold_['same_lora_again']['median_s'] * 1000:>9.1f}")
    print(f"  a new LoRA adds {cold_['extra_s']['median_s'] * 1000:.1f} ms (median of {args.cold})")
    print(f"  first requests of the built-in sets (warm-up): {first_requests(figures['steady'])}")
    v = figures["validation_4000_chars_compel"]
    print(f"validation of a {v['chars']}-character compel prompt: {v['seconds'] * 1000:.0f} ms ({v['outcome']})")
    print(f"tokens read: {figures['prompts']['tokens_read']}")
    print(f"compel's image of the 300-token prompt equals plain's: {figures['prompts']['compel_image_equals_plain']}")
    problems = figures["problems"]
    print("checks: " + ("every image as expected" if not problems else "PROBLEMS:\n  " + "\n  ".join(problems)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="interleaved rounds of each comparison (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="concurrent requests, and --max-batch (default 4)")
    parser.add_argument("--cold", type=int, default=6, help="LoRAs applied for the first time (default 6)")
    parser.add_argument("--json", type=Path, default=RESULTS / "loras_cpu.json", help="where the figures go")
    args = parse_args(parser, {"reps": 1, "warmup": 1, "steps": 6, "cold": 1})

    workdir = Path(tempfile.mkdtemp(prefix="refinery-bench-loras-"))
    try:
        folders = tiny_pair(workdir / "models")
        folders["loras"] = workdir / "loras"
        unet_config = folders["A"] / "unet" / "config.json"
        cold_paths = [
            write_random_lora(unet_config, folders["loras"] / f"cold-{i}.safetensors", rank=4, seed=100 + i)
            for i in range(args.cold)
        ]
        pair = f"local:{folders['A']}+local:{folders['R']}"
        args.metrics_port = free_port()
        flags = ["--pin", pair, "--max-batch", str(args.batch), "--local-models", str(folders["loras"])]
        flags += ["--metrics-port", str(args.metrics_port)]
        service = Service(folders, "cpu", workdir / "cache", [*flags, "--trust-loopback-admin"])
        try:
            for model in (BASE_1, BASE_2, BASE_3, REFINER_1):
                service.pull(model)  # in the cache beforehand: a first use reads the file, nothing is built
            for path in cold_paths:
                service.pull(f"local:{path}")  # registered (hashed) as an operator's pull would
            figures = measure(service, cold_paths, args)
        finally:
            service.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report(figures, args)
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    if figures["problems"]:
        sys.exit("bench_loras: the server did not do what was asked (see PROBLEMS above)")


if __name__ == "__main__":
    main()
