"""SDXL inpainting models (issue 18): a 9-channel UNet is SDXL_INPAINT in every format the store reads, serves
only as a base, takes SDXL base's LoRAs, loads offline from folders and single files, and the built-in
`builtin:tiny-sdxl-inpaint@1` runs in diffusers' inpainting pipeline.

Real-size models are header-only files (tests/fixtures/headers.py) with the shipped configs' key names and
shapes; the tiny model is the built-in one, as a folder and converted to a civitai-style single file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelstore import (
    Architecture,
    Layout,
    ModelRecord,
    ModelStore,
    Role,
    load_pipeline,
    needs_mask,
    parse_air,
    require_lora,
    require_role,
)
from modelstore._architecture import detect_file, detect_folder
from modelstore._builtin import CONFIG_ROOT
from modelstore._config_families import family_for, known_families
from modelstore._model_dims import from_single_file
from modelstore._safetensors_header import read_header
from modelstore.errors import WrongArchitecture
from tests.fixtures.headers import write_header_only
from tests.fixtures.ldm_layout import original_shapes, write_single_file
from tests.fixtures.tiny import TINY_BASE, TINY_REFINER, file_record
from tests.modelstore.real_folders import real_diffusers_folder

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 300  # a hang fails the test; never an expectation about speed
TINY_INPAINT = "builtin:tiny-sdxl-inpaint@1"
REAL_INPAINT = "SDXL inpainting 0.1"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
Shapes = dict[str, tuple[int, ...]]


def _config_folder(name: str) -> Path:
    return next(f.folder for f in known_families() if f.name == name)


@pytest.fixture(scope="module")
def real_inpaint() -> Shapes:
    """The key set of a civitai-style SDXL inpainting checkpoint: SDXL base's with a 9-channel conv_in."""
    return original_shapes(_config_folder(REAL_INPAINT))


@pytest.fixture(scope="module")
def tiny_file(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> ModelRecord:
    folder = model_store.resolve(TINY_INPAINT).path
    return file_record(write_single_file(folder, tmp_path_factory.mktemp("inpaint") / "tiny-sdxl-inpaint.safetensors"))


# ---- detection -------------------------------------------------------------------------------------------


def test_a_real_inpainting_single_file_is_sdxl_inpaint_and_gets_the_inpainting_configs(
    tmp_path: Path, real_inpaint: Shapes
) -> None:
    base = original_shapes(CONFIG_ROOT / "sdxl_base")
    assert real_inpaint.keys() == base.keys()  # the same model but for its input convolution
    assert real_inpaint[CONV_IN] == (320, 9, 3, 3) and base[CONV_IN] == (320, 4, 3, 3)
    path = write_header_only(tmp_path / "sd_xl_inpainting.safetensors", real_inpaint)
    assert detect_file(path) is Architecture.SDXL_INPAINT
    family = family_for(from_single_file(read_header(path).tensors), Architecture.SDXL_INPAINT)
    assert family is not None and family.name == REAL_INPAINT
    assert json.loads((family.folder / "unet" / "config.json").read_text())["in_channels"] == 9


def test_a_real_inpainting_unet_alone_is_known_by_its_shapes(tmp_path: Path, real_inpaint: Shapes) -> None:
    unet = {k: v for k, v in real_inpaint.items() if k.startswith("model.diffusion_model.")}
    assert detect_file(write_header_only(tmp_path / "unet.safetensors", unet)) is Architecture.SDXL_INPAINT


def test_a_real_inpainting_diffusers_folder_is_sdxl_inpaint(tmp_path: Path) -> None:
    # As diffusers/stable-diffusion-xl-1.0-inpainting-0.1 is laid out on the Hub.
    folder = real_diffusers_folder(_config_folder(REAL_INPAINT), tmp_path / "inpainting")
    assert detect_folder(folder) is Architecture.SDXL_INPAINT


def test_nine_channels_make_an_inpainting_model_only_of_a_base(tmp_path: Path) -> None:
    # A refiner-shaped UNet with 9 channels is no model anyone ships: not taken for anything it could run as.
    refiner = original_shapes(CONFIG_ROOT / "sdxl_refiner") | {CONV_IN: (384, 9, 3, 3)}
    assert detect_file(write_header_only(tmp_path / "refiner9.safetensors", refiner)) is Architecture.UNKNOWN


def test_the_tiny_inpainting_model_is_sdxl_inpaint_as_folder_and_single_file(
    model_store: ModelStore, tiny_file: ModelRecord
) -> None:
    record = model_store.resolve(TINY_INPAINT)
    assert record.architecture is detect_folder(record.path) is Architecture.SDXL_INPAINT
    assert tiny_file.architecture is Architecture.SDXL_INPAINT
    family = family_for(from_single_file(read_header(tiny_file.path).tensors), Architecture.SDXL_INPAINT)
    assert family is not None and family.name == TINY_INPAINT


# ---- roles and LoRAs -------------------------------------------------------------------------------------


def _record(architecture: Architecture) -> ModelRecord:
    return ModelRecord(parse_air("civitai:1@2"), Path("/nonexistent"), Layout.SINGLE_FILE, architecture, 0, "")


def test_an_inpainting_model_is_a_base_never_a_refiner() -> None:
    inpaint = _record(Architecture.SDXL_INPAINT)
    require_role(inpaint, Role.BASE)
    with pytest.raises(WrongArchitecture, match="is SDXL inpainting; the refiner must be SDXL refiner or SDXL base"):
        require_role(inpaint, Role.REFINER)
    assert needs_mask(Architecture.SDXL_INPAINT)
    assert not any(needs_mask(a) for a in (Architecture.SDXL_BASE, Architecture.SDXL_REFINER))


def test_sdxl_base_loras_fit_an_inpainting_base_and_refiner_loras_do_not(model_store: ModelStore) -> None:
    for air in ("builtin:tiny-lora-base@1", "builtin:tiny-lora-base@2"):  # PEFT and kohya keys
        require_lora(model_store.resolve(air), Architecture.SDXL_INPAINT, field="loras[0].model")
    with pytest.raises(WrongArchitecture, match="is a LoRA for SDXL refiner; this stage needs a LoRA for SDXL base"):
        require_lora(
            model_store.resolve("builtin:tiny-lora-refiner@1"), Architecture.SDXL_INPAINT, field="loras[0].model"
        )


def test_the_loader_refuses_an_inpainting_model_as_refiner(tiny_file: ModelRecord) -> None:
    with pytest.raises(WrongArchitecture) as refused:
        load_pipeline(tiny_file, role=Role.REFINER, device="cpu")
    assert refused.value.role == Role.REFINER


# ---- the cache's index -----------------------------------------------------------------------------------


def test_the_index_names_it_for_this_store_and_says_unknown_to_older_ones(model_store: ModelStore) -> None:
    model_store.resolve(TINY_INPAINT)
    listed = {m.air: m for m in model_store.list_models()}
    assert listed[TINY_INPAINT].architecture is Architecture.SDXL_INPAINT
    # An older store reads the column into an enumeration without this architecture: it must find a value it
    # knows, the one it would itself read from these weights.
    with sqlite3.connect(model_store.settings.cache_dir / "index.sqlite") as db:
        column, metadata = db.execute(
            "SELECT architecture, metadata FROM models WHERE air = ?", (TINY_INPAINT,)
        ).fetchone()
    assert column == "unknown" and json.loads(metadata)["architecture"] == "sdxl-inpaint"


# ---- the built-in tiny inpainting model ------------------------------------------------------------------


def test_it_shares_the_tiny_bases_encoders_and_vae_and_the_refiners_vae(model_store: ModelStore) -> None:
    def fingerprints(air: str) -> dict[str, str]:
        return {c.name: c.fingerprint for c in model_store.components(model_store.resolve(air))}

    inpaint, base, refiner = fingerprints(TINY_INPAINT), fingerprints(TINY_BASE), fingerprints(TINY_REFINER)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert inpaint[name] == base[name], name
    assert inpaint["vae"] == refiner["vae"] and inpaint["text_encoder_2"] == refiner["text_encoder_2"]
    assert inpaint["unet"] not in (base["unet"], refiner["unet"])


def test_the_single_file_loads_the_folders_exact_nine_channel_unet(
    model_store: ModelStore, tiny_file: ModelRecord
) -> None:
    folder = load_pipeline(model_store.resolve(TINY_INPAINT), role=Role.BASE, device="cpu", dtype=torch.float32)
    single = load_pipeline(tiny_file, role=Role.BASE, device="cpu", dtype=torch.float32)
    for pipe in (folder, single):
        assert type(pipe).__name__ == "StableDiffusionXLPipeline"  # the runner builds its inpainting pipeline
        assert pipe.unet.config.in_channels == 9 and pipe.unet.conv_in.weight.shape[1] == 9
    mine, theirs = single.unet.state_dict(), folder.unet.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in mine.items())


def test_it_inpaints_a_64_pixel_image_in_diffusers_inpainting_pipeline(model_store: ModelStore) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image

    pipe = load_pipeline(model_store.resolve(TINY_INPAINT), role=Role.BASE, device="cpu", dtype=torch.float32)
    inpaint = StableDiffusionXLInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # white repaints
    result = inpaint(
        prompt="a red door",
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        num_inference_steps=4,
        strength=0.99,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    pixels = np.asarray(result)
    assert result.size == (64, 64) and pixels.shape == (64, 64, 3)
    assert np.ptp(pixels) > 0  # a decoded image, not a blank (NaN) one


# ---- what an operator sees -------------------------------------------------------------------------------


def _refinery_models(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "REFINERY_CACHE_DIR": str(cache)}
    environment.pop("REFINERY_SERVER", None)
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "models", *args],
        cwd=cache.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def test_refinery_models_pull_and_list_show_an_inpainting_checkpoint(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pulled = _refinery_models("pull", TINY_INPAINT, cache=cache)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith(f"pulled {TINY_INPAINT} (SDXL inpainting, ")
    listed = _refinery_models("list", cache=cache)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:-1]]
    assert [row[:4] for row in rows] == [[TINY_INPAINT, "checkpoint", "SDXL", "inpainting"]]
