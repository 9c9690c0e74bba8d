"""Loading SDXL pipelines offline from diffusers folders and from civitai-style single files.

The single files are the tiny built-in models written in the original key layout by the test converter, so
a round trip must give back exactly the folder's weights and images.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modelstore import Architecture, ModelRecord, ModelStore
from modelstore._config_families import known_families
from modelstore._pipeline_checks import check_pipeline
from modelstore.errors import CorruptModel, UnsafeCheckpoint, WrongArchitecture
from modelstore.loading import load_pipeline, load_single_file
from modelstore.record import Layout
from server.core.domain import RenderShape, Sample, Sampler
from server.generation.pipelines import PipelinePair
from server.generation.runner import StepState, run
from tests.fixtures.headers import write_header_only
from tests.fixtures.tiny import TINY_BASE, TINY_REFINER, file_record, single_file_records

CPU = "cpu"
FP32 = torch.float32


class _Quiet:
    def on_step(self, state: StepState) -> None:
        pass


@pytest.fixture(scope="module")
def folders(model_store: ModelStore) -> tuple[ModelRecord, ModelRecord]:
    return model_store.resolve(TINY_BASE), model_store.resolve(TINY_REFINER)


@pytest.fixture(scope="module")
def single_files(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRecord, ModelRecord]:
    return single_file_records(model_store, tmp_path_factory.mktemp("single-files"))


def _tiny_family(name: str) -> Path:
    return next(f.folder for f in known_families() if f.name == name)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("index", [0, 1], ids=["base", "refiner"])
def test_single_file_loads_the_folders_exact_weights(
    folders: tuple[ModelRecord, ModelRecord], single_files: tuple[ModelRecord, ModelRecord], index: int
) -> None:
    role = ("base", "refiner")[index]
    original = load_pipeline(folders[index], role=role, device=CPU, dtype=FP32)
    loaded = load_pipeline(single_files[index], role=role, device=CPU, dtype=FP32)

    expected_components = {"unet", "vae", "text_encoder_2"} | ({"text_encoder"} if role == "base" else set())
    modules = {k for k, v in loaded.components.items() if isinstance(v, torch.nn.Module)}
    assert modules == expected_components
    for component in sorted(expected_components):
        mine, theirs = _tensors(getattr(loaded, component)), _tensors(getattr(original, component))
        assert mine.keys() == theirs.keys(), component
        for key, tensor in mine.items():
            assert not tensor.is_meta, f"{component}.{key}"
            assert tensor.dtype == theirs[key].dtype
            assert tensor.dtype == FP32 or not tensor.is_floating_point()
            assert torch.equal(tensor, theirs[key]), f"{component}.{key} differs"
    for tokenizer in ("tokenizer", "tokenizer_2") if role == "base" else ("tokenizer_2",):
        assert len(getattr(loaded, tokenizer)) == 49408
        assert getattr(loaded, tokenizer).model_max_length == 77
    if role == "refiner":
        assert loaded.config.requires_aesthetics_score is True
        assert loaded.config.force_zeros_for_empty_prompt is False
    else:
        assert loaded.config.force_zeros_for_empty_prompt is True


def _generate(base: Any, refiner: Any) -> np.ndarray:
    shape = RenderShape(width=64, height=64, steps=6, base_steps=4, cfg_scale=5.0, sampler=Sampler.EULER_ANCESTRAL)
    samples = [Sample("a lighthouse on a cliff", None, 7)]
    result = run(PipelinePair(base, refiner), shape, samples, _Quiet())
    return np.stack([np.asarray(image) for image in result.images])


def test_two_stage_generation_from_single_files_matches_the_folders(
    folders: tuple[ModelRecord, ModelRecord], single_files: tuple[ModelRecord, ModelRecord]
) -> None:
    def pair(records: tuple[ModelRecord, ModelRecord]) -> np.ndarray:
        base = load_pipeline(records[0], role="base", device=CPU, dtype=FP32)
        refiner = load_pipeline(records[1], role="refiner", device=CPU, dtype=FP32)
        return _generate(base, refiner)

    from_folders, from_files = pair(folders), pair(single_files)
    assert from_files.shape == (1, 64, 64, 3)
    assert from_files.dtype == np.uint8
    assert np.ptp(from_files) > 0  # real pixels, not a blank (NaN) decode that would match anything
    # uint8 pixels are equal even without realigning weights in memory (shared/research/single-file.md P6).
    assert np.array_equal(from_files, from_folders)


def test_an_sdxl_base_serves_as_refiner(single_files: tuple[ModelRecord, ModelRecord]) -> None:
    base = load_pipeline(single_files[0], role="base", device=CPU, dtype=FP32)
    as_refiner = load_pipeline(single_files[0], role="refiner", device=CPU, dtype=FP32)
    assert as_refiner.config.requires_aesthetics_score is False  # 6 time ids, as the base was trained
    images = _generate(base, as_refiner)
    assert np.ptp(images) > 0


class _NetworkAttempts:
    """Counts every DNS lookup and connection; each is refused before anything leaves the machine."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def getaddrinfo(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        self.attempts.append(f"getaddrinfo {host!r}")
        raise OSError(f"no network in this test (lookup of {host!r})")

    def connect(self, sock: socket.socket, address: Any) -> Any:
        self.attempts.append(f"connect {address!r}")
        raise OSError(f"no network in this test (connect to {address!r})")


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Iterator[_NetworkAttempts]:
    counter = _NetworkAttempts()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "getaddrinfo", counter.getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", counter.connect)
    monkeypatch.setattr(socket.socket, "connect_ex", counter.connect)
    yield counter


def test_loading_makes_no_network_attempt(
    network: _NetworkAttempts,
    folders: tuple[ModelRecord, ModelRecord],
    single_files: tuple[ModelRecord, ModelRecord],
) -> None:
    # The counter sees what diffusers and huggingface_hub would do: a lookup, then a connection.
    with pytest.raises(OSError):
        socket.create_connection(("huggingface.co", 443))
    assert network.attempts == ["getaddrinfo 'huggingface.co'"]
    network.attempts.clear()

    for records in (folders, single_files):
        load_pipeline(records[0], role="base", device=CPU, dtype=FP32)
        load_pipeline(records[1], role="refiner", device=CPU, dtype=FP32)
    assert network.attempts == []


def test_a_cache_blob_without_the_safetensors_name_loads_without_unpickling(
    single_files: tuple[ModelRecord, ModelRecord], tmp_path: Path
) -> None:
    blob = tmp_path / "0f3a9c"  # content-addressed caches name files by hash
    shutil.copyfile(single_files[1].path, blob)
    pipe = load_pipeline(file_record(blob), role="refiner", device=CPU, dtype=FP32)
    assert pipe.config.requires_aesthetics_score is True


def test_a_pickle_named_safetensors_is_refused_before_diffusers_sees_it(tmp_path: Path) -> None:
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle protocol 4 stream
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        load_single_file(fake, config=_tiny_family(TINY_BASE), role="base", dtype=FP32)


def test_a_folder_with_pickled_weights_is_refused(folders: tuple[ModelRecord, ModelRecord], tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(folders[0].path, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_suffix(".bin"))
    record = ModelRecord(folders[0].air, folder, Layout.DIFFUSERS, Architecture.SDXL_BASE, 0, "")
    with pytest.raises(UnsafeCheckpoint, match="only pickled weights"):
        load_pipeline(record, role="base", device=CPU, dtype=FP32)


def test_a_config_folder_without_tokenizer_2_is_caught(
    single_files: tuple[ModelRecord, ModelRecord], tmp_path: Path
) -> None:
    # diffusers builds a 2-token tokenizer from an absent folder without a word (single-file.md P8).
    config = tmp_path / "configs"
    shutil.copytree(_tiny_family(TINY_BASE), config)
    shutil.rmtree(config / "tokenizer_2")
    with pytest.raises(CorruptModel, match="tokenizer_2 has 2 tokens but text_encoder_2 expects 49408"):
        load_single_file(single_files[0].path, config=config, role="base", dtype=FP32)


def test_a_refiner_without_the_aesthetics_flag_is_caught(folders: tuple[ModelRecord, ModelRecord]) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        str(folders[1].path), dtype=FP32, local_files_only=True, requires_aesthetics_score=False
    )
    with pytest.raises(CorruptModel, match="requires_aesthetics_score is False"):
        check_pipeline(pipe, name="refiner", role="refiner", architecture=Architecture.SDXL_REFINER)


def test_a_refiner_folder_that_lost_its_aesthetics_flag_still_loads_right(
    folders: tuple[ModelRecord, ModelRecord], tmp_path: Path
) -> None:
    folder = tmp_path / "refiner"
    shutil.copytree(folders[1].path, folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    del index["requires_aesthetics_score"]
    index_path.write_text(json.dumps(index))
    record = ModelRecord(folders[1].air, folder, Layout.DIFFUSERS, Architecture.SDXL_REFINER, 0, "")
    pipe = load_pipeline(record, role="refiner", device=CPU, dtype=FP32)
    assert pipe.config.requires_aesthetics_score is True  # from the weights' 5 time ids, not the config


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        # diffusers leaves text-encoder tensors it does not find on the meta device, silently (P2).
        (
            "conditioner.embedders.1.model.transformer.resblocks.2.mlp.",
            r"4 of \d+ text_encoder_2 tensors are missing from the checkpoint \(e\.g\. "
            r"text_model\.encoder\.layers\.2\.mlp",
        ),
        # For the UNet and VAE it fails to cast them to the requested dtype, without naming them.
        (
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.",
            "lacks UNet or VAE tensors that its configuration needs",
        ),
    ],
    ids=["text-encoder", "unet"],
)
def test_tensors_missing_from_the_checkpoint_are_caught(
    model_store: ModelStore, tmp_path: Path, drop: str, message: str
) -> None:
    base, _ = single_file_records(model_store, tmp_path, drop=(drop,))
    with pytest.raises(CorruptModel, match=message):
        load_pipeline(base, role="base", device=CPU, dtype=FP32)


def test_a_unet_only_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    # Real SDXL shapes (a header with no data): only the real UNet is known without its text encoders.
    from modelstore._builtin import CONFIG_ROOT
    from tests.fixtures.ldm_layout import original_shapes

    shapes = original_shapes(CONFIG_ROOT / "sdxl_base")
    unet_only = {key: shape for key, shape in shapes.items() if not key.startswith("conditioner.")}
    record = file_record(write_header_only(tmp_path / "unet-only.safetensors", unet_only))
    assert record.architecture is Architecture.SDXL_BASE
    with pytest.raises(CorruptModel, match="has no text encoders; only complete checkpoints are loaded"):
        load_pipeline(record, role="base", device=CPU, dtype=FP32)


@pytest.mark.parametrize(("index", "role"), [(1, "base")], ids=["refiner-as-base"])
def test_a_model_that_cannot_serve_the_role_is_refused(
    single_files: tuple[ModelRecord, ModelRecord], index: int, role: str
) -> None:
    with pytest.raises(WrongArchitecture, match="SDXL refiner; the base must be SDXL base"):
        load_pipeline(single_files[index], role=role, device=CPU, dtype=FP32)


def test_non_sdxl_checkpoints_are_refused_before_loading(tmp_path: Path) -> None:
    flux = write_header_only(
        tmp_path / "flux.safetensors",
        {"double_blocks.0.img_attn.qkv.weight": (96, 32), "single_blocks.0.linear1.weight": (96, 32)},
    )
    with pytest.raises(WrongArchitecture) as refused:
        load_pipeline(file_record(flux), role="refiner", device=CPU, dtype=FP32)
    assert refused.value.found == "FLUX"
    assert refused.value.expected == "SDXL refiner or SDXL base"


def test_an_sdxl_of_unknown_size_is_refused_naming_its_shapes(tmp_path: Path) -> None:
    from tests.fixtures.ldm_layout import original_shapes

    shapes = original_shapes(_tiny_family(TINY_REFINER))
    shapes["first_stage_model.encoder.conv_in.weight"] = (24, 3, 3, 3)  # a VAE no known config has
    odd = write_header_only(tmp_path / "odd.safetensors", shapes)
    with pytest.raises(CorruptModel, match=r"fits no known configuration .*VAE channels=24"):
        load_pipeline(file_record(odd), role="refiner", device=CPU, dtype=FP32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_cuda_loads_and_generates_the_same_from_both_layouts(
    folders: tuple[ModelRecord, ModelRecord], single_files: tuple[ModelRecord, ModelRecord]
) -> None:
    images = []
    for records in (folders, single_files):
        base = load_pipeline(records[0], role="base", device="cuda")  # no dtype: float16 on CUDA
        refiner = load_pipeline(records[1], role="refiner", device="cuda")
        for pipe in (base, refiner):
            for name, module in pipe.components.items():
                if isinstance(module, torch.nn.Module):
                    parameters = list(module.parameters())
                    assert {p.dtype for p in parameters} == {torch.float16}, name
                    assert {p.device.type for p in parameters} == {"cuda"}, name
            assert pipe.vae.config.force_upcast  # diffusers decodes in float32: SDXL's VAE overflows in fp16
        images.append(_generate(base, refiner))
    assert np.ptp(images[1]) > 0
    assert np.array_equal(images[1], images[0])
