"""LoRA measurements through a served `refinery serve` (issue 17), shared by benchmarks/bench_loras.py (the CPU,
tiny pair) and the "loras" sections of benchmarks/gpu_sdxl.py (full-size SDXL): one request kind per `Variant`,
each request timed end to end and its image checked (`Checks`), comparisons interleaved request by request."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
from PIL import Image

from benchmarks._service import SEED, Service, log, median_timings
from refinery.v1 import generation_pb2 as pb

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, highly detailed"
_ROLES = {value: name.removeprefix("MODEL_ROLE_").lower() for name, value in pb.ModelRole.items()}


@dataclass(frozen=True)
class Variant:
    """One kind of request: its base's and its refiner's LoRAs as (AIR, weight), its prompt and weighting."""

    base: tuple[tuple[str, float], ...] = ()
    refiner: tuple[tuple[str, float], ...] = ()
    prompt: str = PROMPT
    weighting: pb.PromptWeighting = pb.PROMPT_WEIGHTING_UNSPECIFIED

    def request(self, size: int, steps: int, *, cfg: float = 7.0) -> pb.GenerateRequest:
        lora = [pb.Lora(model=m, weight=w) for m, w in self.base]
        refiner = pb.Refiner(start_step_percentage=90, loras=[pb.Lora(model=m, weight=w) for m, w in self.refiner])
        return pb.GenerateRequest(
            positive_prompt=self.prompt, width=size, height=size, steps=steps, seed=SEED, cfg_scale=cfg,
            loras=lora, refiner=refiner, prompt_weighting=self.weighting,
        )  # fmt: skip


@dataclass
class Call:
    """One Generate, end to end: seconds, a digest of the image's pixels, what the image reported and which
    models the server said it loaded (by role)."""

    seconds: float
    pixels: str
    rgb: numpy.ndarray[Any, Any]
    loras: list[tuple[str, float]]
    refiner_loras: list[tuple[str, float]]
    tokens: list[tuple[str, str, int]]
    loading: Counter[str] = field(default_factory=Counter)


def call(service: Service, variant: Variant, size: int, steps: int, *, cfg: float = 7.0) -> Call:
    started = time.perf_counter()
    image, loading = None, Counter[str]()
    try:
        for response in service.stub.Generate(variant.request(size, steps, cfg=cfg), timeout=1800):
            kind = response.WhichOneof("event")
            if kind == "image":
                image = response.image
            elif kind == "model_loading" and response.model_loading.phase != pb.ModelLoading.PHASE_READY:
                loading[_ROLES.get(response.model_loading.role, "?")] += 1
    except Exception as error:  # INTERNAL hides the cause from clients; the server's log has it
        raise RuntimeError(f"Generate failed: {error}; the server's log ends:\n{service.log_tail()}") from error
    seconds = time.perf_counter() - started
    assert image is not None, "no image"
    with Image.open(io.BytesIO(image.data)) as decoded:
        rgb = numpy.asarray(decoded.convert("RGB"), dtype=numpy.int16)
    return Call(
        seconds, hashlib.sha256(rgb.tobytes()).hexdigest()[:16], rgb,
        [(lora.model, round(lora.weight, 3)) for lora in image.loras],
        [(lora.model, round(lora.weight, 3)) for lora in image.refiner_loras],
        [(pb.Stage.Name(t.stage), t.text_encoder, t.positive_tokens) for t in image.prompt_tokens],
        loading,
    )  # fmt: skip


class Checks:
    """What every request's image must show; what differs is listed in `problems` (the run then fails)."""

    def __init__(self) -> None:
        self.first: dict[Variant, Call] = {}
        self.problems: list[str] = []

    def see(self, name: str, variant: Variant, got: Call, *, first: bool = False, batched: bool = False) -> None:
        """`first`: the request may apply its LoRAs anew. `batched`: it may have shared a batch, so its pixels
        may differ from its solo run by float rounding (a level or two; tests/integration/test_scheduling.py)."""
        asked = [(_short(m), round(w, 3)) for m, w in variant.base]
        if [(_short(m), w) for m, w in got.loras] != asked:
            self.problems.append(f"{name}: the image reports LoRAs {got.loras}, asked {asked}")
        if len(got.refiner_loras) != len(variant.refiner):
            self.problems.append(f"{name}: the image reports refiner LoRAs {got.refiner_loras}")
        reloaded = {role: n for role, n in got.loading.items() if role != "lora"}
        if reloaded:
            self.problems.append(f"{name}: the server loaded {reloaded} for it (the pair again?)")
        elif not first and got.loading:
            self.problems.append(f"{name}: LoRAs already applied were loaded again ({dict(got.loading)})")
        known = self.first.setdefault(variant, got)
        if batched:
            worst = int(numpy.abs(known.rgb - got.rgb).max())
            if worst > 2:
                self.problems.append(f"{name}: batched, its pixels differ from its solo run's by up to {worst}")
        elif known.pixels != got.pixels:
            self.problems.append(f"{name}: the same request gave other pixels ({known.pixels}, {got.pixels})")

    def distinct(self, variants: dict[str, Variant]) -> None:
        """Different LoRA sets must give different images."""
        seen: dict[str, str] = {}
        for name, variant in variants.items():
            digest = self.first[variant].pixels
            if digest in seen:
                self.problems.append(f"{name} gave the same pixels as {seen[digest]}: were its LoRAs applied?")
            seen.setdefault(digest, name)

    def same(self, a: Variant, b: Variant) -> bool:
        return self.first[a].pixels == self.first[b].pixels


def _short(model: str) -> str:
    """A LoRA's name as asked and as reported alike (the report gives canonical AIRs)."""
    return model.removeprefix("local:").rsplit("/", 1)[-1]


def stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(values), 4),
        "min_s": round(min(values), 4),
        "runs_s": [round(v, 4) for v in values],
    }


def interleaved(
    service: Service, variants: dict[str, Variant], args: argparse.Namespace, checks: Checks, *, baseline: str
) -> dict[str, Any]:
    """Each variant once per round, in turn, after `args.warmup` rounds; medians, and ratios to `baseline`."""
    first: dict[str, float] = {}
    for _ in range(args.warmup):
        for name, variant in variants.items():
            got = call(service, variant, args.size, args.steps)
            checks.see(name, variant, got, first=True)
            first.setdefault(name, got.seconds)  # the first request of each set: its LoRAs applied anew
    service.timings()
    times: dict[str, list[float]] = {name: [] for name in variants}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, variant in variants.items():
            got = call(service, variant, args.size, args.steps)
            checks.see(name, variant, got)
            times[name].append(got.seconds)
            stages[name] += service.timings()
    base = statistics.median(times[baseline])
    figures = {name: {**stats(times[name]), "server_stages_s": median_timings(stages[name])} for name in variants}
    for name in variants:
        figures[name]["first_request_s"] = round(first[name], 4)
        figures[name]["ratio_to_" + baseline] = round(statistics.median(times[name]) / base, 3)
    return figures


def cold(
    service: Service, loras: Sequence[str], args: argparse.Namespace, checks: Checks, *, weight: float = 1.0
) -> dict[str, Any]:
    """Each LoRA of `loras` (never applied before) once, then again at once (warm): the first request's extra
    time over the second's is reading the file and injecting the adapter."""
    first, again = [], []
    for i, model in enumerate(loras):
        variant = Variant(base=((model, weight),))
        got = call(service, variant, args.size, args.steps)
        checks.see(f"cold {i}", variant, got, first=True)
        first.append(got.seconds)
        got = call(service, variant, args.size, args.steps)
        checks.see(f"warm {i}", variant, got)
        again.append(got.seconds)
    extra = [a - b for a, b in zip(first, again, strict=True)]
    return {
        "first_request": stats(first),
        "same_lora_again": stats(again),
        "extra_s": {"median_s": round(statistics.median(extra), 4), "runs_s": [round(e, 4) for e in extra]},
    }


def switching(
    service: Service, a: Variant, b: Variant, args: argparse.Namespace, checks: Checks, *, block: int = 4
) -> dict[str, Any]:
    """Rounds of `block` requests alternating A, B, A, B against the same `block` grouped A.., B.. (so both
    sides run the same requests), taking turns; per-request medians."""
    orders = {"alternating": [a, b] * (block // 2), "grouped": [a] * (block // 2) + [b] * (block // 2)}
    for variant in (a, b):  # both sets loaded before anything is timed
        checks.see("switch warm-up", variant, call(service, variant, args.size, args.steps), first=True)
    times: dict[str, list[float]] = {name: [] for name in orders}
    for _ in range(args.reps):
        for name, order in orders.items():
            for variant in order:
                got = call(service, variant, args.size, args.steps)
                checks.see(f"switch {name}", variant, got)
                times[name].append(got.seconds)
    alternating, grouped = (statistics.median(times[name]) for name in orders)
    return {
        "alternating": stats(times["alternating"]),
        "grouped": stats(times["grouped"]),
        "ratio_alternating_to_grouped": round(alternating / grouped, 3),
        "switch_cost_s": round(alternating - grouped, 4),
    }


def write_random_lora(unet_config: Path, dest: Path, *, rank: int, seed: int, scale: float = 1.0) -> Path:
    """A random LoRA in the diffusers / PEFT format (`unet.<module>.lora_A.weight` [rank, in], `lora_B` [out,
    rank], fp16) on the attention projections (to_q, to_k, to_v, to_out.0) of the UNet `unet_config`
    describes. The UNet is built on the meta device: only its layers' names and shapes are read."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(unet_config.read_text()))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            down = torch.randn(rank, module.in_features, generator=generator) / math.sqrt(module.in_features)
            up = torch.randn(module.out_features, rank, generator=generator) * scale / math.sqrt(rank)
            tensors[f"unet.{name}.lora_A.weight"] = down.to(torch.float16).contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = up.to(torch.float16).contiguous()
    assert tensors, f"no attention projections in {unet_config}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest), metadata={"format": "pt"})
    return dest


def steady_and_switching(
    service: Service, base: Sequence[str], refiner: str, args: argparse.Namespace, checks: Checks
) -> dict[str, Any]:
    """a (steady state, interleaved) and b (switching) with three base LoRAs and a refiner LoRA."""
    one = ((base[0], 1.0),)
    three = ((base[0], 1.0), (base[1], 0.8), (base[2], 0.6))
    steady = {
        "no_lora": Variant(),
        "one_base_lora": Variant(base=one),
        "three_base_loras": Variant(base=three),
        "three_base_one_refiner_lora": Variant(base=three, refiner=((refiner, 1.0),)),
    }
    log("a: steady state, interleaved")
    figures = {"steady": interleaved(service, steady, args, checks, baseline="no_lora")}
    checks.distinct(steady)
    log("b: switching LoRA sets")
    figures["switching"] = switching(service, Variant(base=one), Variant(base=three[1:]), args, checks)
    return figures


def cold_figures(service: Service, paths: Sequence[Path], args: argparse.Namespace, checks: Checks) -> dict[str, Any]:
    """a, cold: LoRAs registered beforehand but never applied, their files dropped from the page cache first."""
    log("a: cold, LoRAs never applied before")
    for path in paths:
        with path.open("rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return cold(service, [f"local:{path}" for path in paths], args, checks)


def write_loras(folders: dict[str, Path], dest: Path, *, rank: int, cold: int) -> dict[str, list[Path]]:
    """Random LoRAs for the pair in `folders` (A, R): three for the base, one for the refiner, and `cold` more
    for the base to apply for the first time."""

    def write(model: str, name: str, seed: int) -> Path:
        return write_random_lora(folders[model] / "unet" / "config.json", dest / name, rank=rank, seed=seed)

    return {
        "base": [write("A", f"base-{i}.safetensors", i) for i in range(3)],
        "refiner": [write("R", "refiner.safetensors", 3)],
        "cold": [write("A", f"cold-{i}.safetensors", 100 + i) for i in range(cold)],
    }


def summary(figures: dict[str, Any]) -> str:
    """One line: the steady-state ratios to no LoRA, what a switch and a first use add."""
    steady = ", ".join(f"{name} {row['ratio_to_no_lora']}x" for name, row in figures["steady"].items())
    switch, cold_ = figures["switching"]["switch_cost_s"], figures.get("cold", {}).get("extra_s", {})
    return f"{steady}; a switch {switch * 1000:.0f} ms; a first use {cold_.get('median_s', float('nan')) * 1000:.0f} ms"
