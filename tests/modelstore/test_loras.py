"""LoRAs in the store: what a header says a LoRA is, LoRAs resolved from every source like checkpoints (cache,
quota, leases, trigger words kept offline), their AIRs, and the refusals where a LoRA or a checkpoint is the
wrong thing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from modelstore import (
    Architecture,
    ModelKind,
    ModelRecord,
    ModelStore,
    NotALora,
    Role,
    load_pipeline,
    parse_air,
    parse_lora_air,
    parse_stored_air,
    require_lora,
    require_role,
)
from modelstore._architecture import identify_file
from modelstore.errors import InvalidModelId, ModelInUse, ModelNotFound, QuotaExceeded, WrongArchitecture
from modelstore.record import Layout
from tests.conftest import TINY_BASE
from tests.fakes import payloads
from tests.fakes.civitai import FakeCivitai, FakeFile
from tests.fakes.hub import FakeHub
from tests.fixtures.tiny import single_file_records
from tests.modelstore.conftest import MakeStore

ATTN = "down_blocks_1_attentions_0_transformer_blocks_0"  # a cross-attention block, as kohya spells it
TE_LAYER = "text_model_encoder_layers_0_self_attn"
SIZE = 400_000  # each LoRA of the quota tests is a little over this


def lora_file(shapes: dict[str, tuple[int, ...]], *, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return save({key: rng.standard_normal(shape).astype(np.float16) for key, shape in shapes.items()})


def kohya(module: str, width: int, *, rank: int = 4) -> dict[str, tuple[int, ...]]:
    return {
        f"{module}.lora_down.weight": (rank, width),
        f"{module}.lora_up.weight": (width, rank),
        f"{module}.alpha": (),
    }


def kohya_sdxl(context: int = 2048, *, seed_padding: int = 0) -> dict[str, tuple[int, ...]]:
    shapes = kohya(f"lora_unet_{ATTN}_attn2_to_k", context) | kohya(f"lora_unet_{ATTN}_attn1_to_q", 640)
    shapes |= kohya(f"lora_te1_{TE_LAYER}_q_proj", 768) | kohya(f"lora_te2_{TE_LAYER}_q_proj", 1280)
    if seed_padding:
        shapes[f"lora_unet_{ATTN}_attn1_to_v.lora_up.weight"] = (seed_padding // 8, 4)
    return shapes


def peft(module: str, width: int, *, rank: int = 4) -> dict[str, tuple[int, ...]]:
    return {f"{module}.lora_A.weight": (rank, width), f"{module}.lora_B.weight": (width, rank)}


UNET = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
HEADERS: dict[str, tuple[dict[str, tuple[int, ...]], Architecture]] = {
    "kohya SDXL base": (kohya_sdxl(), Architecture.SDXL_BASE),
    "PEFT SDXL base": (
        peft(f"{UNET}.attn2.to_v", 2048) | peft("text_encoder.text_model.encoder.layers.0.self_attn.k_proj", 768),
        Architecture.SDXL_BASE,
    ),
    "PEFT SDXL refiner": (
        peft(f"{UNET}.attn2.to_k", 1280) | peft("text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj", 1280),
        Architecture.SDXL_REFINER,
    ),
    "old diffusers processor keys": (
        {
            f"{UNET}.attn2.processor.to_k_lora.down.weight": (4, 2048),
            f"{UNET}.attn2.processor.to_k_lora.up.weight": (640, 4),
        },
        Architecture.SDXL_BASE,
    ),
    "old diffusers lora.down keys, SD 1.5": (
        {f"{UNET}.attn2.to_v.lora.down.weight": (4, 768), f"{UNET}.attn2.to_v.lora.up.weight": (320, 4)},
        Architecture.SD1,
    ),
    "kohya SD 1.5": (
        kohya(f"lora_unet_{ATTN}_attn2_to_k", 768) | kohya(f"lora_te_{TE_LAYER}_q_proj", 768),
        Architecture.SD1,
    ),
    "kohya SD 2.x": (
        kohya(f"lora_unet_{ATTN}_attn2_to_v", 1024) | kohya(f"lora_te_{TE_LAYER}_q_proj", 1024),
        Architecture.SD2,
    ),
    "kohya SD 1.5 text encoder only": (kohya(f"lora_te_{TE_LAYER}_v_proj", 768), Architecture.SD1),
    "kohya SDXL text encoders only": (
        kohya(f"lora_te1_{TE_LAYER}_q_proj", 768) | kohya(f"lora_te2_{TE_LAYER}_q_proj", 1280),
        Architecture.SDXL_BASE,
    ),
    "bigG alone fits either SDXL model": (kohya(f"lora_te2_{TE_LAYER}_q_proj", 1280), Architecture.UNKNOWN),
    "diffusers FLUX": (peft("transformer.single_transformer_blocks.0.attn.to_k", 3072), Architecture.FLUX),
    "kohya FLUX": (kohya("lora_unet_double_blocks_0_img_attn_qkv", 3072), Architecture.FLUX),
    "kohya FLUX, transformer prefix": (
        kohya("lora_transformer_single_transformer_blocks_0_attn_to_k", 3072),
        Architecture.FLUX,
    ),
    "two context widths": (
        kohya(f"lora_unet_{ATTN}_attn2_to_k", 2048) | kohya(f"lora_unet_{ATTN}_attn2_to_v", 768),
        Architecture.UNKNOWN,
    ),
    "refiner UNet with CLIP-L: contradicts itself": (
        kohya(f"lora_unet_{ATTN}_attn2_to_k", 1280) | kohya(f"lora_te1_{TE_LAYER}_q_proj", 768),
        Architecture.UNKNOWN,
    ),
    "tiny base (its own widths)": (peft(f"{UNET}.attn2.to_k", 72), Architecture.SDXL_BASE),
    "tiny refiner (its own widths)": (peft(f"{UNET}.attn2.to_k", 40), Architecture.SDXL_REFINER),
}


@pytest.mark.parametrize("case", HEADERS, ids=str)
def test_a_lora_is_known_by_its_keys_and_shapes(tmp_path: Path, case: str) -> None:
    shapes, architecture = HEADERS[case]
    path = tmp_path / "lora.safetensors"
    path.write_bytes(lora_file(shapes))
    identity = identify_file(path)
    assert (identity.kind, identity.architecture) == (ModelKind.LORA, architecture)


def test_a_checkpoint_is_not_a_lora(model_store: ModelStore, tmp_path: Path) -> None:
    base, refiner = single_file_records(model_store, tmp_path)
    assert identify_file(base.path).kind is ModelKind.CHECKPOINT
    assert identify_file(refiner.path).architecture is Architecture.SDXL_REFINER


# ---- AIRs ---------------------------------------------------------------------------------------------------


def test_lora_airs_parse_where_a_lora_is_wanted() -> None:
    assert parse_lora_air("urn:air:sdxl:lora:civitai:1@2") == "civitai:1@2"
    assert parse_lora_air("civitai:1@2").canonical == "civitai:1@2"  # untyped: the weights decide
    assert parse_stored_air("urn:air:sdxl:lora:civitai:1@2") == parse_stored_air("urn:air:sdxl:checkpoint:civitai:1@2")
    with pytest.raises(InvalidModelId, match="is a lora, not a checkpoint"):
        parse_air("urn:air:sdxl:lora:civitai:1@2")  # as a model: refused as before
    with pytest.raises(InvalidModelId, match="is a checkpoint, not a LoRA"):
        parse_lora_air("urn:air:sdxl:checkpoint:civitai:1@2")
    for parse in (parse_air, parse_lora_air, parse_stored_air):
        with pytest.raises(InvalidModelId, match="is a vae"):
            parse("urn:air:sdxl:vae:civitai:1@2")


# ---- sources ------------------------------------------------------------------------------------------------


def add_lora(civitai: FakeCivitai, model: int, version: int, data: bytes, *, words: list[object]) -> None:
    files = [(FakeFile(version * 10, "style.safetensors", size="full", fp="fp16"), data)]
    civitai.add_version(model, version, files, model_type="LORA")
    civitai.versions[version]["trainedWords"] = words


def test_a_civitai_lora_is_pulled_with_its_trigger_words(make_store: MakeStore, civitai: FakeCivitai) -> None:
    add_lora(civitai, 5, 50, lora_file(kohya_sdxl()), words=["foxy style", " ", 7, "snowscape"])

    record = make_store().resolve("urn:air:sdxl:lora:civitai:5@50")

    assert (record.kind, record.architecture, record.layout) == (
        ModelKind.LORA,
        Architecture.SDXL_BASE,
        Layout.SINGLE_FILE,
    )
    assert record.trigger_words == ("foxy style", "snowscape")  # strings only, blanks dropped
    assert record.path.suffix == ".safetensors"
    (row,) = make_store().list_models()
    assert (row.air, row.kind, row.trigger_words) == ("civitai:5@50", ModelKind.LORA, ("foxy style", "snowscape"))
    # Offline, from the index alone: the words stay with the cached LoRA.
    before = len(civitai.requests)
    offline = make_store(offline=True).resolve("civitai:5@50")
    assert offline.trigger_words == ("foxy style", "snowscape") and offline.kind is ModelKind.LORA
    assert len(civitai.requests) == before


def test_the_weights_decide_what_a_civitai_version_is(make_store: MakeStore, civitai: FakeCivitai) -> None:
    # A "LORA" version whose file is a whole checkpoint is a checkpoint (and refused as a LoRA, see below); a
    # checkpoint's version keeps no trigger words.
    add_lora(civitai, 6, 60, payloads.checkpoint(), words=["w"])
    civitai.add_version(7, 70, [(FakeFile(700, "ckpt.safetensors"), payloads.checkpoint(seed=1))])
    civitai.versions[70]["trainedWords"] = ["ignored"]
    store = make_store()

    assert store.resolve("civitai:6@60").kind is ModelKind.CHECKPOINT
    checkpoint = store.resolve("civitai:7@70")
    assert (checkpoint.kind, checkpoint.trigger_words) == (ModelKind.CHECKPOINT, ())


def test_a_lora_from_a_hugging_face_repo(make_store: MakeStore, hub: FakeHub) -> None:
    data = lora_file(peft(f"{UNET}.attn2.to_k", 1280))
    hub.add_repo("acme/loras", {"refiner_style.safetensors": data, "README.md": b"# loras"})

    record = make_store().resolve("hf:acme/loras@main+refiner_style.safetensors")

    assert (record.kind, record.architecture) == (ModelKind.LORA, Architecture.SDXL_REFINER)
    assert record.path.read_bytes() == data
    assert hub.file_gets("acme/loras") == ["refiner_style.safetensors"]


def test_a_local_lora_file(make_store: MakeStore, tmp_path: Path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    path = root / "mine.safetensors"
    path.write_bytes(lora_file(kohya_sdxl()))
    store = make_store()
    store.confine_local([root])

    record = store.resolve(parse_lora_air(f"local:{path}"))

    assert (record.kind, record.architecture, record.path) == (ModelKind.LORA, Architecture.SDXL_BASE, path)
    assert store.resolve(str(path)).kind is ModelKind.LORA  # found again in the index, still a LoRA
    assert store.describe(f"local:{path}").kind is ModelKind.LORA


def quota_loras(civitai: FakeCivitai) -> list[str]:
    for n in (1, 2, 3):
        add_lora(civitai, n, n * 10, lora_file(kohya_sdxl(seed_padding=SIZE), seed=n), words=[f"w{n}"])
    return ["civitai:1@10", "civitai:2@20", "civitai:3@30"]


def test_loras_count_in_the_quota_and_leases_keep_them(make_store: MakeStore, civitai: FakeCivitai) -> None:
    a, b, c = quota_loras(civitai)
    store = make_store(max_bytes=int(2.5 * SIZE))  # room for two
    store.resolve(a)
    store.resolve(b)
    assert store.used_bytes() > 2 * SIZE

    with store.lease(a):  # a is the least recently used, but in use: b goes
        store.resolve(c)
        assert sorted(m.air for m in store.list_models()) == [a, c]
        with pytest.raises(ModelInUse):
            store.delete(a)
        with store.lease(c), pytest.raises(QuotaExceeded, match="in use"):
            store.resolve(b)
    assert store.delete(a) > SIZE


# ---- roles --------------------------------------------------------------------------------------------------


def record(kind: ModelKind, architecture: Architecture, air: str = "civitai:5@50") -> ModelRecord:
    return ModelRecord(parse_stored_air(air), Path("/nonexistent"), Layout.SINGLE_FILE, architecture, 0, "0" * 64, kind)


@pytest.mark.parametrize("role", [Role.BASE, Role.REFINER])
def test_a_lora_named_as_a_model_is_refused(role: Role) -> None:
    with pytest.raises(
        WrongArchitecture, match=r"civitai:5@50 is a LoRA \(for SDXL base\), not a checkpoint"
    ) as caught:
        require_role(record(ModelKind.LORA, Architecture.SDXL_BASE), role)
    assert caught.value.role is role and caught.value.air == "civitai:5@50"


def test_a_lora_record_never_loads_as_a_pipeline(make_store: MakeStore, civitai: FakeCivitai) -> None:
    add_lora(civitai, 5, 50, lora_file(kohya_sdxl()), words=[])
    lora = make_store().resolve("civitai:5@50")
    with pytest.raises(WrongArchitecture, match="is a LoRA"):
        load_pipeline(lora, role=Role.BASE, device="cpu")


def test_a_checkpoint_named_as_a_lora_is_refused() -> None:
    checkpoint = record(ModelKind.CHECKPOINT, Architecture.SDXL_BASE, TINY_BASE)
    with pytest.raises(NotALora, match=r"builtin:tiny-sdxl-base@1 is a checkpoint \(SDXL base\), not a LoRA") as caught:
        require_lora(checkpoint, Architecture.SDXL_BASE, field="loras[0].model")
    assert (caught.value.field, caught.value.air) == ("loras[0].model", TINY_BASE)
    assert isinstance(caught.value, WrongArchitecture)  # the same family of refusals, FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("trained_on", "fits", "says"),
    [
        (Architecture.SD1, Architecture.SDXL_BASE, "is a LoRA for Stable Diffusion 1.x"),
        (Architecture.FLUX, Architecture.SDXL_REFINER, "is a LoRA for FLUX"),
        (Architecture.UNKNOWN, Architecture.SDXL_BASE, "is a LoRA for an unrecognised model"),
        (
            Architecture.SDXL_BASE,
            Architecture.SDXL_REFINER,
            "is a LoRA for SDXL base; this stage needs a LoRA for SDXL refiner",
        ),
        (
            Architecture.SDXL_REFINER,
            Architecture.SDXL_BASE,
            "is a LoRA for SDXL refiner; this stage needs a LoRA for SDXL base",
        ),
    ],
)
def test_a_lora_for_another_model_is_refused(trained_on: Architecture, fits: Architecture, says: str) -> None:
    with pytest.raises(WrongArchitecture, match=f"civitai:5@50 {says}") as caught:
        require_lora(record(ModelKind.LORA, trained_on), fits, field="refiner.loras[1].model")
    assert not isinstance(caught.value, NotALora)
    assert (caught.value.field, caught.value.role) == ("refiner.loras[1].model", Role.LORA)


def test_a_lora_for_its_stage_passes() -> None:
    require_lora(record(ModelKind.LORA, Architecture.SDXL_BASE), Architecture.SDXL_BASE, field="loras[0].model")
    require_lora(record(ModelKind.LORA, Architecture.SDXL_REFINER), Architecture.SDXL_REFINER, field="x")


def test_an_sd15_lora_from_a_local_file_is_refused_for_sdxl(make_store: MakeStore, tmp_path: Path) -> None:
    path = tmp_path / "sd15.safetensors"
    path.write_bytes(lora_file(HEADERS["kohya SD 1.5"][0]))
    lora = make_store().resolve(f"local:{path}")
    assert (lora.kind, lora.architecture) == (ModelKind.LORA, Architecture.SD1)
    with pytest.raises(WrongArchitecture, match=r"Stable Diffusion 1\.x"):
        require_lora(lora, Architecture.SDXL_BASE, field="loras[0].model")


def test_an_unknown_builtin_lora_version_names_the_ones_there_are(model_store: ModelStore) -> None:
    with pytest.raises(
        ModelNotFound, match=r"no built-in LoRA builtin:tiny-lora-base@9 \(built-in: .*tiny-lora-refiner@1"
    ):
        model_store.resolve("builtin:tiny-lora-base@9")
