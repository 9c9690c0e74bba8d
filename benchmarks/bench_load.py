"""Cold-load time of cached SDXL models: modelstore.loading against plain diffusers, side by side.

Each row loads the same files the same way twice over: once through `modelstore.loading.load_pipeline`
(header checks, architecture detection, config-family choice, post-load checks) and once straight through
diffusers (`from_single_file(config=...)` / `from_pretrained`, the same arguments). Runs alternate between
the two (ABBA...) after one warm-up each, so both see the same page cache; the median of `--runs` is shown.

    python benchmarks/bench_load.py                      # the tiny built-in pair on the CPU
    python benchmarks/bench_load.py --quick              # one run each: a check that it runs
    python benchmarks/bench_load.py --full-size --device cuda --models base
        # builds full-size random-weight single files from modelstore/configs (or --config-dir) first

"Cold" means a fresh pipeline object from files on disk, as when a worker loads a model it does not hold;
the files themselves are in the OS page cache after the warm-up, as a cached model normally is.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._quick import parse_args  # noqa: E402
from modelstore import ModelRecord, ModelStore, StoreSettings  # noqa: E402
from modelstore._builtin import CONFIG_ROOT  # noqa: E402
from modelstore._config_families import known_families  # noqa: E402
from modelstore.loading import load_pipeline, preferred_dtype  # noqa: E402
from modelstore.record import Architecture  # noqa: E402
from tests.fixtures.ldm_layout import (  # noqa: E402
    bigg_to_original,
    clip_l_to_original,
    unet_to_original,
    vae_to_original,
    write_single_file,
)
from tests.fixtures.tiny import file_record  # noqa: E402


@dataclass(frozen=True)
class Case:
    label: str
    layout: str
    role: str
    record: ModelRecord
    config: Path | None  # the config folder diffusers gets for a single file


def _direct(case: Case, device: str, dtype: Any) -> Any:
    """What a caller of diffusers writes to load the same files offline, with the same arguments."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if case.role == "base" else StableDiffusionXLImg2ImgPipeline
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "local_files_only": True,
        "add_watermarker": False,
        "image_encoder": None,
        "feature_extractor": None,
    }
    if case.role == "refiner":
        kwargs["requires_aesthetics_score"] = case.record.architecture is Architecture.SDXL_REFINER
    if case.config is None:
        pipe = cls.from_pretrained(str(case.record.path), use_safetensors=True, **kwargs)
    else:
        pipe = cls.from_single_file(str(case.record.path), config=str(case.config), **kwargs)
    return pipe.to(device)


def _time(load: Callable[[], Any], device: str) -> float:
    started = time.perf_counter()
    pipe = load()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return elapsed


def _tiny_cases(work: Path) -> list[Case]:
    store = ModelStore(StoreSettings(cache_dir=work / "cache", offline=True))
    families = {f.name: f.folder for f in known_families()}
    cases = []
    for air, role in (("builtin:tiny-sdxl-base@1", "base"), ("builtin:tiny-sdxl-refiner@1", "refiner")):
        folder = store.resolve(air)
        single = file_record(write_single_file(folder.path, work / f"{folder.path.name}.safetensors"))
        name = air.removeprefix("builtin:").split("@")[0]
        cases.append(Case(name, "diffusers", role, folder, None))
        cases.append(Case(name, "single-file", role, single, families[air]))
    return cases


def _full_size_file(config: Path, dest: Path, device: str) -> Path:
    """A random-weight fp16 checkpoint of the full-size model `config` describes, in the original layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tensors: dict[str, torch.Tensor] = {}

    def add(converted: dict[str, torch.Tensor]) -> None:
        tensors.update({k: v.to("cpu", torch.float16).contiguous() for k, v in converted.items()})

    with torch.device(device):  # initialise on the GPU: minutes faster than CPU init at full size
        unet: Any = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        add(unet_to_original(unet.state_dict(), dict(unet.config)))
        del unet
        vae: Any = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
        add(vae_to_original(vae.state_dict(), dict(vae.config)))
        has_clip_l = (config / "text_encoder" / "config.json").is_file()
        if has_clip_l:
            add(clip_l_to_original(CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")).state_dict()))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2"))
        add(bigg_to_original(bigg.state_dict(), embedder=1 if has_clip_l else 0))
    save_file(tensors, str(dest), metadata={"format": "pt"})
    return dest


def _full_size_cases(work: Path, config_root: Path, models: list[str], device: str) -> list[Case]:
    cases = []
    for model in models:
        config = config_root / f"sdxl_{model}"
        started = time.perf_counter()
        path = _full_size_file(config, work / f"sdxl_{model}.safetensors", device)
        size_gib = path.stat().st_size / 2**30
        print(f"built {path.name}: {size_gib:.2f} GiB in {time.perf_counter() - started:.0f} s", flush=True)
        cases.append(Case(f"sdxl-{model} (full size)", "single-file", model, file_record(path), config))
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed loads per loader and model (default 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="benchmark full-size random-weight SDXL files")
    parser.add_argument("--config-dir", type=Path, default=CONFIG_ROOT, help="holds sdxl_base/ and sdxl_refiner/")
    parser.add_argument("--models", default="base,refiner", help="full size: which of base,refiner")
    parser.add_argument("--work", type=Path, help="where to build the files (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parse_args(parser, {"runs": 1}, argv)

    dtype = preferred_dtype(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.full_size:
            cases = _full_size_cases(work, args.config_dir, args.models.split(","), args.device)
        else:
            cases = _tiny_cases(work)
        rows = []
        for case in cases:
            ours = functools.partial(load_pipeline, case.record, role=case.role, device=args.device, dtype=dtype)
            theirs = functools.partial(_direct, case, args.device, dtype)
            # One warm-up each: imports, the page cache, the config families.
            _time(ours, args.device)
            _time(theirs, args.device)
            timings: dict[str, list[float]] = {"modelstore": [], "diffusers": []}
            for run in range(args.runs):
                order = [("modelstore", ours), ("diffusers", theirs)]
                for name, load in order if run % 2 == 0 else reversed(order):
                    timings[name].append(_time(load, args.device))
            rows.append((case, {k: statistics.median(v) for k, v in timings.items()}, timings))
            runs_ms = {k: [round(t * 1000) for t in v] for k, v in timings.items()}
            print(f"{case.label} {case.layout} {case.role}: {runs_ms}", flush=True)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    setup = f"{args.device} ({device_name}), {dtype}, torch {torch.__version__}"
    print(f"\ncold load, median of {args.runs} runs: {setup}")
    print(f"{'model':<28} {'layout':<12} {'role':<8} {'modelstore':>11} {'diffusers':>11} {'overhead':>9}")
    for case, median, _ in rows:
        ours_s, theirs_s = median["modelstore"], median["diffusers"]
        print(
            f"{case.label:<28} {case.layout:<12} {case.role:<8} "
            f"{ours_s * 1000:>9.0f}ms {theirs_s * 1000:>9.0f}ms {(ours_s / theirs_s - 1) * 100:>+8.1f}%"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {"model": c.label, "layout": c.layout, "role": c.role, "runs_s": t, "median_s": m}
                    for c, m, t in rows
                ],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
