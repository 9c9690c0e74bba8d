"""Architecture detection from safetensors headers: single files in the original layout and diffusers folders.

Real-size checkpoints are header-only files (tests/fixtures/headers.py) whose key names and shapes come from
the shipped SDXL configs through the test converter, so they have exactly the keys a real civitai file has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modelstore import Architecture, ModelStore
from modelstore._architecture import detect_file, detect_folder
from modelstore._builtin import CONFIG_ROOT
from modelstore._config_families import family_for, known_families
from modelstore._model_dims import from_single_file
from modelstore._safetensors_header import read_header
from modelstore.errors import CorruptModel, ModelNotFound, UnsafeCheckpoint
from tests.fixtures.headers import write_header_only
from tests.fixtures.ldm_layout import original_shapes
from tests.fixtures.tiny import TINY_BASE, TINY_REFINER, single_file_records
from tests.modelstore.real_folders import real_diffusers_folder

Shapes = dict[str, tuple[int, ...]]


@pytest.fixture(scope="module")
def real_base() -> Shapes:
    return original_shapes(CONFIG_ROOT / "sdxl_base")


@pytest.fixture(scope="module")
def real_refiner() -> Shapes:
    return original_shapes(CONFIG_ROOT / "sdxl_refiner")


def _file(tmp_path: Path, shapes: Shapes, name: str = "model.safetensors") -> Path:
    return write_header_only(tmp_path / name, shapes)


# ---- SDXL, real size -------------------------------------------------------------------------------------


def test_real_sdxl_key_sets_are_what_civitai_files_hold(real_base: Shapes, real_refiner: Shapes) -> None:
    # Guards the fixtures below: the key counts and shapes of sd_xl_base_1.0 / sd_xl_refiner_1.0
    # (shared/research/single-file.md, "Real-size check").
    assert len(real_base) == 2513
    assert len(real_refiner) == 1857
    assert real_base["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert real_refiner["model.diffusion_model.label_emb.0.0.weight"] == (1536, 2560)
    assert real_base["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert real_refiner["conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"] == (
        3840,
        1280,
    )


def test_real_sdxl_base_and_refiner_are_detected_and_get_the_shipped_configs(
    tmp_path: Path, real_base: Shapes, real_refiner: Shapes
) -> None:
    for shapes, architecture, family in (
        (real_base, Architecture.SDXL_BASE, "SDXL base 1.0"),
        (real_refiner, Architecture.SDXL_REFINER, "SDXL refiner 1.0"),
    ):
        path = _file(tmp_path, shapes)
        assert detect_file(path) is architecture
        chosen = family_for(from_single_file(read_header(path).tensors), architecture)
        assert chosen is not None and chosen.name == family


def test_unet_only_sdxl_files_are_known_by_their_real_shapes(
    tmp_path: Path, real_base: Shapes, real_refiner: Shapes
) -> None:
    for shapes, architecture in (
        (real_base, Architecture.SDXL_BASE),
        (real_refiner, Architecture.SDXL_REFINER),
    ):
        unet = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
        assert detect_file(_file(tmp_path, unet)) is architecture


def test_text_encoders_decide_between_base_and_refiner_not_the_unet_alone(
    tmp_path: Path, real_base: Shapes, real_refiner: Shapes
) -> None:
    # A refiner UNet with the base's text encoders cannot condition on them: the context width disagrees.
    text = {k: v for k, v in real_base.items() if k.startswith("conditioner.")}
    unet = {k: v for k, v in real_refiner.items() if k.startswith(("model.", "first_stage_model."))}
    assert detect_file(_file(tmp_path, unet | text)) is Architecture.UNKNOWN


def test_an_sdxl_unet_with_neither_4_nor_9_input_channels_is_unknown(tmp_path: Path, real_base: Shapes) -> None:
    # 4: text-to-image; 9: inpainting (test_inpaint_models.py). 8 (e.g. instruct-pix2pix: latent + image
    # latent) is no model this service runs.
    shapes = dict(real_base)
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    assert detect_file(_file(tmp_path, shapes)) is Architecture.UNKNOWN


def test_an_edm_checkpoint_with_sdxl_structure_is_not_taken_for_a_base(tmp_path: Path, real_base: Shapes) -> None:
    # Playground v2.5: SDXL base's exact structure, but EDM; SDXL's schedulers would make noise.
    assert detect_file(_file(tmp_path, real_base | {"edm_mean": (1, 4, 1, 1), "edm_std": (1, 4, 1, 1)})) is (
        Architecture.UNKNOWN
    )


def test_real_sdxl_diffusers_folders_are_detected(tmp_path: Path) -> None:
    base = real_diffusers_folder(CONFIG_ROOT / "sdxl_base", tmp_path / "base")
    refiner = real_diffusers_folder(CONFIG_ROOT / "sdxl_refiner", tmp_path / "refiner")
    assert detect_folder(base) is Architecture.SDXL_BASE
    assert detect_folder(refiner) is Architecture.SDXL_REFINER


# ---- SDXL, the tiny built-in models ----------------------------------------------------------------------


def test_tiny_builtin_folders_are_sdxl(model_store: ModelStore) -> None:
    assert detect_folder(model_store.resolve(TINY_BASE).path) is Architecture.SDXL_BASE
    assert detect_folder(model_store.resolve(TINY_REFINER).path) is Architecture.SDXL_REFINER


def test_tiny_builtin_single_files_are_sdxl_and_get_their_own_configs(model_store: ModelStore, tmp_path: Path) -> None:
    base, refiner = single_file_records(model_store, tmp_path)
    assert base.architecture is detect_file(base.path) is Architecture.SDXL_BASE
    assert refiner.architecture is detect_file(refiner.path) is Architecture.SDXL_REFINER
    for record, name in ((base, TINY_BASE), (refiner, TINY_REFINER)):
        family = family_for(from_single_file(read_header(record.path).tensors), record.architecture)
        assert family is not None and family.name == name


def test_time_ids_are_derived_not_looked_up(tmp_path: Path) -> None:
    # The tiny base's shapes with a wider pooled projection (32 instead of 24) and adm input 80 = 32 + 6 x 8:
    # still a base. With adm input 75 (43 left: not 6 time ids of any width), not SDXL at all.
    tiny_base = next(f.folder for f in known_families() if f.name == TINY_BASE)
    shapes = original_shapes(tiny_base)
    projection = "conditioner.embedders.1.model.text_projection"
    label_emb = "model.diffusion_model.label_emb.0.0.weight"
    assert shapes[projection] == (40, 24) and shapes[label_emb] == (128, 72)
    assert detect_file(_file(tmp_path, shapes | {projection: (40, 32), label_emb: (128, 80)})) is (
        Architecture.SDXL_BASE
    )
    assert detect_file(_file(tmp_path, shapes | {projection: (40, 32), label_emb: (128, 75)})) is (Architecture.UNKNOWN)


def test_folder_detection_reads_the_weights_not_the_configs_claims(model_store: ModelStore, tmp_path: Path) -> None:
    folder = tmp_path / "lying"
    shutil.copytree(model_store.resolve(TINY_BASE).path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
    index["requires_aesthetics_score"] = True
    (folder / "model_index.json").write_text(json.dumps(index))
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    unet_config["projection_class_embeddings_input_dim"] = 64  # what a refiner would have
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    assert detect_folder(folder) is Architecture.SDXL_BASE


# ---- other families --------------------------------------------------------------------------------------

SD1 = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
}
SD2 = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
}
SD3 = {
    "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536),
    "model.diffusion_model.x_embedder.proj.weight": (1536, 16, 2, 2),
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}
FLUX = {
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "single_blocks.0.linear1.weight": (21504, 3072),
    "img_in.weight": (3072, 64),
}
FLUX_COMFY = {f"model.diffusion_model.{k}": v for k, v in FLUX.items()}


@pytest.mark.parametrize(
    ("shapes", "architecture"),
    [
        (SD1, Architecture.SD1),
        (SD2, Architecture.SD2),
        (SD3, Architecture.SD3),
        (FLUX, Architecture.FLUX),
        (FLUX_COMFY, Architecture.FLUX),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, Architecture.UNKNOWN),
        ({"encoder.layers.0.weight": (4, 4)}, Architecture.UNKNOWN),
    ],
    ids=["sd1", "sd2", "sd3", "flux", "flux-prefixed", "unet-without-attention", "unrelated"],
)
def test_other_single_file_families_are_named(tmp_path: Path, shapes: Shapes, architecture: Architecture) -> None:
    assert detect_file(_file(tmp_path, shapes)) is architecture


def _folder(root: Path, index: dict[str, object], components: dict[str, Shapes]) -> Path:
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    for name, shapes in components.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
        write_header_only(root / name / "diffusion_pytorch_model.safetensors", shapes)
    return root


def test_other_diffusers_folders_are_named(tmp_path: Path) -> None:
    unet = {
        "conv_in.weight": (320, 4, 3, 3),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    }
    sd15 = _folder(tmp_path / "sd15", {"unet": ["diffusers", "UNet2DConditionModel"]}, {"unet": unet})
    assert detect_folder(sd15) is Architecture.SD1
    sd3 = {
        "pos_embed.proj.weight": (1536, 16, 2, 2),
        "context_embedder.weight": (1536, 4096),
        "transformer_blocks.0.attn.add_q_proj.weight": (1536, 1536),
    }
    folder = _folder(tmp_path / "sd3", {"transformer": ["diffusers", "SD3Transformer2DModel"]}, {"transformer": sd3})
    assert detect_folder(folder) is Architecture.SD3
    flux = {
        "x_embedder.weight": (3072, 64),
        "transformer_blocks.0.attn.add_q_proj.weight": (3072, 3072),
        "single_transformer_blocks.0.proj_mlp.weight": (12288, 3072),
    }
    # The config may say anything; the weights say FLUX.
    folder = _folder(tmp_path / "flux", {"transformer": ["diffusers", "SD3Transformer2DModel"]}, {"transformer": flux})
    assert detect_folder(folder) is Architecture.FLUX


def test_sharded_diffusers_weights_are_followed(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "sharded", {"transformer": ["diffusers", "FluxTransformer2DModel"]}, {})
    (folder / "transformer").mkdir()
    write_header_only(folder / "transformer" / "a.safetensors", {"x_embedder.weight": (8, 4)})
    write_header_only(folder / "transformer" / "b.safetensors", {"single_transformer_blocks.0.norm.weight": (8,)})
    index = {
        "weight_map": {
            "x_embedder.weight": "a.safetensors",
            "single_transformer_blocks.0.norm.weight": "b.safetensors",
        }
    }
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert detect_folder(folder) is Architecture.FLUX

    index["weight_map"]["x_embedder.weight"] = "../../elsewhere.safetensors"
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpoint, match="invalid shard"):
        detect_folder(folder)


# ---- refusals --------------------------------------------------------------------------------------------


def test_pickles_are_refused_by_content_whatever_their_name(tmp_path: Path) -> None:
    zipped = tmp_path / "model.safetensors"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # a torch.save zip renamed
    with pytest.raises(UnsafeCheckpoint, match="PyTorch zip"):
        detect_file(zipped)


def test_folders_without_usable_weights_are_refused(model_store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"no model_index\.json"):
        detect_folder(tmp_path)
    folder = tmp_path / "copy"
    shutil.copytree(model_store.resolve(TINY_REFINER).path, folder)
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.rename(folder / "text_encoder_2" / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match=r"only pickled weights \(pytorch_model.bin\)"):
        detect_folder(folder)
    (folder / "text_encoder_2" / "pytorch_model.bin").unlink()
    with pytest.raises(CorruptModel, match="text_encoder_2 has no weights"):
        detect_folder(folder)
