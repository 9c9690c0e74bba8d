"""LoRAs as the runner applies them (server/generation/loras.py), on the tiny base: equal to diffusers'
`load_lora_weights` + `set_adapters` run by hand, stacked weights included; a batch without LoRAs renders as if
none had ever been loaded; switching sets on a compiled UNet runs eagerly and compiles nothing; a LoRA whose
layers are not in the model is refused, not applied in part; the adapters a UNet keeps are bounded."""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from modelstore import ModelStore, Role, load_pipeline, parse_air
from server.core.domain import LoraSpec
from server.core.errors import DoesNotFit
from server.generation import loras
from server.generation.compiling import Compiler, CompileState, UNetDispatch
from server.generation.loras import LoraFile
from server.generation.tuning import Tuning, tune_pipeline
from tests.conftest import TINY_BASE

WAIT_S = 300
# The hand-run loads several adapters onto one model, which is what PEFT's warning is about.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def _lora_file(pipe: Any, folder: Path, seed: int, *, targets: tuple[str, ...] = ("to_q", "to_v")) -> Path:
    """A random PEFT-format LoRA of the tiny base's UNet (diffusers' `unet.` prefix), saved as safetensors."""
    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    tensors = {f"unet.{k}": v.detach().clone().contiguous() * 4 for k, v in get_peft_model_state_dict(unet).items()}
    path = folder / f"lora-{seed}-{'-'.join(targets)}.safetensors"
    save_file(tensors, str(path))
    return path


def _file(path: Path, weight: float, field: str = "loras[0].model") -> LoraFile:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraFile(LoraSpec(parse_air(f"local:{path}"), weight), path, digest, field)


def _image(pipe: Any, seed: int = 3) -> np.ndarray:
    out = pipe(
        prompt="a lighthouse",
        width=64,
        height=64,
        num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    return np.asarray(out.images)


@pytest.fixture
def pipe(model_store: ModelStore) -> Any:
    return load_pipeline(model_store.resolve(TINY_BASE), role=Role.BASE, device="cpu", dtype=torch.float32)


@pytest.fixture
def by_hand(model_store: ModelStore) -> Callable[[list[tuple[Path, float]]], np.ndarray]:
    """A fresh pipeline per call, LoRAs loaded and weighted as diffusers documents it."""

    def run(files: list[tuple[Path, float]]) -> np.ndarray:
        fresh = load_pipeline(model_store.resolve(TINY_BASE), role=Role.BASE, device="cpu", dtype=torch.float32)
        assert isinstance(fresh, StableDiffusionXLPipeline)
        for i, (path, _) in enumerate(files):
            fresh.load_lora_weights(str(path), adapter_name=f"hand{i}")
        fresh.set_adapters([f"hand{i}" for i in range(len(files))], [w for _, w in files])
        return _image(fresh)

    return run


def test_stacked_loras_equal_diffusers_by_hand(pipe: Any, by_hand: Any, tmp_path: Path) -> None:
    plain = _image(pipe)
    one, two = _lora_file(pipe, tmp_path, 1), _lora_file(pipe, tmp_path, 2, targets=("to_k", "to_out.0"))
    loras.apply(pipe, [_file(one, 0.7), _file(two, -1.5, "loras[1].model")])
    stacked = _image(pipe)
    assert np.abs(stacked - plain).mean() > 2 / 255  # the LoRAs do change the image
    np.testing.assert_array_equal(stacked, by_hand([(one, 0.7), (two, -1.5)]))
    # The same adapters, other weights: nothing reloads, the weights are the hand-run's.
    loras.apply(pipe, [_file(one, 1.0)])
    np.testing.assert_array_equal(_image(pipe), by_hand([(one, 1.0)]))


def test_a_batch_without_loras_renders_as_if_none_was_ever_loaded(pipe: Any, tmp_path: Path) -> None:
    plain = _image(pipe)
    loras.apply(pipe, [_file(_lora_file(pipe, tmp_path, 5), 1.0)])
    assert not np.array_equal(_image(pipe), plain)
    loras.apply(pipe, [])
    np.testing.assert_array_equal(_image(pipe), plain)


def test_a_lora_whose_layers_are_mostly_missing_is_refused_and_leaves_nothing(pipe: Any, tmp_path: Path) -> None:
    plain = _image(pipe)
    good = _lora_file(pipe, tmp_path, 6)
    tensors = load_file(str(good))
    # Most layers renamed to blocks this UNet does not have: a LoRA for another model of the same widths.
    renamed = {}
    for i, (key, value) in enumerate(sorted(tensors.items())):
        renamed[key.replace("down_blocks.", "down_blocks.9") if i % 8 else key] = value
    bad = tmp_path / "elsewhere.safetensors"
    save_file(renamed, str(bad))
    with pytest.raises(DoesNotFit) as refused:
        loras.apply(pipe, [_file(bad, 1.0, "loras[2].model")])
    assert refused.value.field == "loras[2].model"
    assert not getattr(pipe.unet, "peft_config", None)
    loras.apply(pipe, [])
    np.testing.assert_array_equal(_image(pipe), plain)


def test_loaded_adapters_are_bounded(pipe: Any, tmp_path: Path) -> None:
    files = [_file(_lora_file(pipe, tmp_path, 100 + i), 1.0) for i in range(loras.MAX_ADAPTERS + 2)]
    for file in files:
        loras.apply(pipe, [file])
    assert len(pipe.unet.peft_config) == loras.MAX_ADAPTERS
    assert files[-1].adapter in pipe.unet.peft_config and files[0].adapter not in pipe.unet.peft_config


class _Graphs:
    """A graph compiler that compiles nothing (the traced graph runs as it is) and counts what it is given."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, graph: Any, example_inputs: list[Any], mode: str) -> Callable[..., Any]:
        with self.lock:
            self.count += 1
        return graph.forward  # type: ignore[no-any-return]


@pytest.fixture
def compiled(pipe: Any) -> Iterator[tuple[Any, Compiler, _Graphs]]:
    graphs = _Graphs()
    compiler = Compiler("cpu", "default", max_images=1, max_sizes=1, compile_graph=graphs)
    tune_pipeline(pipe, Tuning("default"), compiler=compiler, model=TINY_BASE, role=Role.BASE)
    compiler.request_size(pipe.unet, 64, 64)
    assert compiler.wait_idle(WAIT_S)
    assert compiler.snapshot()[0][0].state is CompileState.READY
    yield pipe, compiler, graphs
    compiler.close(WAIT_S)


def test_switching_lora_sets_on_a_compiled_unet_compiles_nothing(
    compiled: tuple[Any, Compiler, _Graphs], tmp_path: Path
) -> None:
    pipe, compiler, graphs = compiled
    dispatch = pipe.unet.forward
    assert isinstance(dispatch, UNetDispatch)
    plain = _image(pipe)
    assert dispatch.calls["compiled"] == 4 and graphs.count == 1
    a, b = _file(_lora_file(pipe, tmp_path, 11), 0.8), _file(_lora_file(pipe, tmp_path, 12), 1.2)
    images = {}
    for files in ([a], [b], [a, b], [a]):
        loras.apply(pipe, files)
        images[tuple(f.digest for f in files)] = _image(pipe)
    # LoRA batches run eagerly (the graphs know no adapters); the LoRA-free one after them is compiled again.
    assert dispatch.calls["compiled"] == 4
    loras.apply(pipe, [])
    np.testing.assert_array_equal(_image(pipe), plain)
    assert dispatch.calls["compiled"] == 8
    assert graphs.count == 1 and len(compiler.snapshot()[0]) == 1  # nothing compiled, nothing queued
    assert len({v.tobytes() for v in images.values()}) == 3  # a, b, a+b: three different images
