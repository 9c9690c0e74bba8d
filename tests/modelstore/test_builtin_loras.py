"""The built-in tiny LoRAs: made deterministically, cached like downloads, in the formats they claim, and loaded by
diffusers onto the tiny pipelines with every key matched, changing the image."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from modelstore import Architecture, Layout, ModelKind, ModelStore, Role, load_pipeline, require_lora
from modelstore._builtin_loras import BUILTIN_LORAS, build
from tests.conftest import TINY_BASE, TINY_REFINER

BASE_LORAS = ["builtin:tiny-lora-base@1", "builtin:tiny-lora-base@2", "builtin:tiny-lora-base@3"]
REFINER_LORA = "builtin:tiny-lora-refiner@1"
# The parts each LoRA adapts (its key prefixes), and the rank of its matrices.
PARTS = {
    "builtin:tiny-lora-base@1": ({"unet", "text_encoder", "text_encoder_2"}, 4),
    "builtin:tiny-lora-base@2": ({"lora_unet", "lora_te1", "lora_te2"}, 8),
    "builtin:tiny-lora-base@3": ({"unet"}, 4),
    REFINER_LORA: ({"unet", "text_encoder_2"}, 4),
}
KOHYA_PARTS = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no Mapping)


def part_of(key: str) -> str:
    """The part a key adapts, as its file spells it: `unet`, `text_encoder_2`, `lora_te1`, ..."""
    if key.startswith("lora_"):
        return next(p for p in KOHYA_PARTS if key.startswith(f"{p}_"))
    return key.split(".", 1)[0]


def test_every_builtin_lora_is_listed() -> None:
    assert set(BUILTIN_LORAS) == set(PARTS)


@pytest.mark.parametrize("air", sorted(PARTS))
def test_a_builtin_lora_is_cached_in_the_format_it_claims(model_store: ModelStore, air: str, tmp_path: Path) -> None:
    record = model_store.resolve(air)
    fits = Architecture.SDXL_REFINER if "refiner" in air else Architecture.SDXL_BASE

    assert (record.kind, record.layout, record.architecture) == (ModelKind.LORA, Layout.SINGLE_FILE, fits)
    require_lora(record, fits, field="loras[0].model")
    weights = tensors(record.path)
    parts, rank = PARTS[air]
    assert {part_of(key) for key in weights} == parts
    kohya = air.endswith("base@2")
    down = [v for k, v in weights.items() if k.endswith(".lora_down.weight" if kohya else ".lora_A.weight")]
    assert down and {v.shape[0] for v in down} == {rank}
    if kohya:
        alphas = [k for k in weights if k.endswith(".alpha")]
        assert len(alphas) == len(down) and {float(weights[k]) for k in alphas} == {rank / 2}
    assert all(v.dtype is torch.float16 and torch.isfinite(v).all() for v in weights.values())
    # Deterministic: built again from its seed, byte for byte the cached file.
    build(BUILTIN_LORAS[air], tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == record.path.read_bytes()


class _Heard(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def heard() -> Iterator[list[str]]:
    """Warnings diffusers, transformers and peft log or warn while a LoRA loads (their loggers do not propagate)."""
    handler = _Heard()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield handler.messages
    handler.messages.extend(str(w.message) for w in caught)
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def base_pipe(model_store: ModelStore) -> Any:
    return load_pipeline(model_store.resolve(TINY_BASE), role=Role.BASE, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def refiner_pipe(model_store: ModelStore) -> Any:
    return load_pipeline(model_store.resolve(TINY_REFINER), role=Role.REFINER, device="cpu", dtype=torch.float32)


def image(pipe: Any, *, refiner: bool) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(1)
    common: dict[str, Any] = {"prompt": "a red fox in the snow", "num_inference_steps": 4, "output_type": "np"}
    if refiner:
        start = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        out = pipe(image=start, strength=0.5, generator=generator, **common)
    else:
        out = pipe(height=64, width=64, generator=generator, **common)
    return np.asarray(out.images[0], dtype=np.float64) * 255


def adapted(module: Any, adapter: str) -> dict[str, Any]:
    """The modules of `module` that carry LoRA layers of `adapter`, by their path."""
    return {name: m for name, m in module.named_modules() if adapter in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("air", [*BASE_LORAS, REFINER_LORA])
def test_a_builtin_lora_loads_with_every_key_matched_and_changes_the_image(
    model_store: ModelStore, base_pipe: Any, refiner_pipe: Any, heard: list[str], air: str
) -> None:
    refiner = air == REFINER_LORA
    pipe = refiner_pipe if refiner else base_pipe
    before = image(pipe, refiner=refiner)
    path = model_store.resolve(air).path
    weights = tensors(path)
    adapter = "lora_under_test"

    pipe.load_lora_weights(str(path), adapter_name=adapter)
    try:
        after = image(pipe, refiner=refiner)
        for part in PARTS[air][0]:
            component = getattr(pipe, KOHYA_PARTS.get(part, part))
            layers = adapted(component, adapter)
            in_file = [k for k in weights if part_of(k) == part and k.endswith((".lora_A.weight", ".lora_down.weight"))]
            assert len(layers) == len(in_file), f"{air}: {part} has {len(in_file)} LoRA modules, {len(layers)} loaded"
            for key in in_file if not part.startswith("lora_") else []:  # PEFT keys name the very module
                name = key.removeprefix(f"{part}.").removesuffix(".lora_A.weight")
                layer = layers.get(name) or layers[name.removeprefix("text_model.")]
                assert torch.equal(layer.lora_A[adapter].weight, weights[key].float())
    finally:
        pipe.unload_lora_weights()

    # "No LoRA keys ... prefix='text_encoder'" is fine for a LoRA without that part, and only then.
    no_keys = [m for m in heard if m.startswith("No LoRA keys") and not _absent(m, air)]
    assert no_keys == [] and [m for m in heard if "unexpected keys" in m.lower()] == []
    assert np.isfinite(after).all()
    assert np.abs(after - before).mean() > 3.0  # levels of 255: plainly visible
    np.testing.assert_array_equal(image(pipe, refiner=refiner), before)  # unloaded: the model as it was


def _absent(message: str, air: str) -> bool:
    """Whether diffusers' "No LoRA keys ... prefix='X'" is about a part the LoRA does not have."""
    prefix = message.split("prefix='", 1)[1].split("'", 1)[0]
    return prefix not in {KOHYA_PARTS.get(part, part) for part in PARTS[air][0]}
