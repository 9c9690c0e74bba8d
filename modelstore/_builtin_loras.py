"""The built-in tiny LoRAs: LoRAs for the built-in tiny SDXL models (`_builtin`), so that LoRAs run through
the store, the loader and a generation offline, on a laptop CPU, like the tiny models themselves.

- `builtin:tiny-lora-base@1`: diffusers / PEFT keys (`unet.….lora_A.weight`), rank 4; the base UNet's
  attention projections (to_q, to_k, to_v, to_out.0) and both text encoders' q/k/v/out_proj;
- `builtin:tiny-lora-base@2`: the same parts in kohya / A1111 keys (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`,
  `.lora_down.weight` / `.lora_up.weight` and an `.alpha` of half the rank), rank 8;
- `builtin:tiny-lora-base@3`: PEFT keys, the UNet only, other weights: a second LoRA to stack with @1;
- `builtin:tiny-lora-refiner@1`: PEFT keys for the tiny refiner's UNet (its attentions read bigG alone, so
  their widths differ from the base's) and its `text_encoder_2`.

Each is drawn from a fixed seed with peft (`init_lora_weights=False`: both matrices random, where a trained
LoRA's start would be a no-op) on modules built from the tiny models' own configs, so the keys and shapes are
what diffusers expects of a LoRA for those very modules; the kohya file is the PEFT one renamed as kohya's
scripts name modules (the naming diffusers' `lora_conversion_utils` reads back). The up matrices are scaled
so that one LoRA at weight 1 visibly changes a 64x64 image without overflowing fp16. Text-encoder keys keep
the `text_model.` level that real files have (and that diffusers drops for transformers' flattened CLIP).
Files are fp16 safetensors of a few hundred KB, installed into the cache as single files like a download.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelstore import _builtin
from modelstore._architecture import identify_file
from modelstore._cache import SINGLE_FILE_NAME, Cache
from modelstore.air import AIR
from modelstore.errors import ModelNotFound
from modelstore.record import Layout, ModelRecord

_SEED = 20260417
_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Up matrices times this: a LoRA at weight 1 then moves a 64x64 image by about 10-20 levels of 255 on average
# (two stacked at weight 2 by under 30), plainly visible and far from overflowing fp16.
_STRENGTH = 2.0
_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@dataclass(frozen=True)
class BuiltinLora:
    name: str
    version: str
    refiner: bool  # fits the tiny refiner's UNet, else the tiny base's
    kohya: bool  # kohya / A1111 keys with alphas, else diffusers / PEFT keys
    rank: int
    seed: int
    encoders: tuple[str, ...] = ()  # text encoders it adapts besides the UNet: "text_encoder", "text_encoder_2"

    @property
    def air(self) -> str:
        return f"builtin:{self.name}@{self.version}"


_BOTH = ("text_encoder", "text_encoder_2")
BUILTIN_LORAS: dict[str, BuiltinLora] = {
    spec.air: spec
    for spec in (
        BuiltinLora("tiny-lora-base", "1", refiner=False, kohya=False, rank=4, seed=_SEED, encoders=_BOTH),
        BuiltinLora("tiny-lora-base", "2", refiner=False, kohya=True, rank=8, seed=_SEED + 1, encoders=_BOTH),
        BuiltinLora("tiny-lora-base", "3", refiner=False, kohya=False, rank=4, seed=_SEED + 2),
        BuiltinLora("tiny-lora-refiner", "1", refiner=True, kohya=False, rank=4, seed=_SEED + 3, encoders=_BOTH[1:]),
    )
}


def names_a_lora(air: AIR) -> bool:
    """Whether `air` is one of these LoRAs, or another version of one (which `install` refuses, naming them)."""
    return air.id in {spec.name for spec in BUILTIN_LORAS.values()}


def build(spec: BuiltinLora, dest: Path) -> None:
    """Write `spec` as one fp16 .safetensors file at `dest`."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(spec.seed)
    weights = _lora_weights(spec, "unet", _tiny_unet(spec.refiner), _UNET_TARGETS)
    for name in spec.encoders:
        encoder = _tiny_encoder(name)
        weights |= _lora_weights(spec, name, encoder, _ENCODER_TARGETS, inner="text_model.")
    if spec.kohya:
        weights = _as_kohya(weights, alpha=spec.rank / 2)
    tensors = {key: value.detach().to(torch.float16).contiguous() for key, value in sorted(weights.items())}
    save_file(tensors, str(dest), metadata={"format": "pt"})


def _tiny_unet(refiner: bool) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(_builtin.unet_config(refiner))


def _tiny_encoder(name: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**_builtin.clip_l_config()))
    return CLIPTextModelWithProjection(CLIPTextConfig(**_builtin.bigg_config()))


def _lora_weights(
    spec: BuiltinLora, part: str, module: Any, targets: tuple[str, ...], inner: str = ""
) -> dict[str, Any]:
    """Random LoRA matrices for `targets` of `module`, keyed as diffusers saves them (`part.` + module path;
    `inner` is a level of the path the module no longer has but files do)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.rank, init_lora_weights=False, target_modules=list(targets))
    adapted = inject_adapter_in_model(config, module)
    weights = {}
    for key, value in get_peft_model_state_dict(adapted).items():
        path = key if key.startswith(inner) else inner + key
        weights[f"{part}.{path}"] = value * _STRENGTH if ".lora_B." in key else value
    if not weights:
        raise RuntimeError(f"peft adapted nothing in the tiny {part}")  # a config change: never ship an empty LoRA
    return {k: torch.as_tensor(v) for k, v in weights.items()}


def _as_kohya(weights: dict[str, Any], *, alpha: float) -> dict[str, Any]:
    """PEFT keys renamed as kohya's scripts write them: `lora_unet_` / `lora_te1_` / `lora_te2_` and the module
    path with underscores, `.lora_down` / `.lora_up`, and an `.alpha` per module (the up matrix is scaled by
    rank / alpha so that the LoRA does what the PEFT one with alpha = rank did)."""
    import torch

    kohya: dict[str, Any] = {}
    for key, value in weights.items():
        part, _, rest = key.partition(".")
        module, _, matrix = rest.rpartition(".lora_")
        name = _KOHYA_PREFIXES[part] + module.replace(".", "_")
        if matrix.startswith("A."):
            kohya[f"{name}.lora_down.weight"] = value
            kohya[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            kohya[f"{name}.lora_up.weight"] = value * (value.shape[1] / alpha)
    return kohya


def install(air: AIR, cache: Cache, in_use: Callable[[str], bool]) -> ModelRecord:
    """Build the built-in LoRA `air` names and keep it in `cache` (quota and all, like a download)."""
    spec = BUILTIN_LORAS.get(air.canonical)
    if spec is None:
        raise ModelNotFound(f"no built-in LoRA {air.canonical} (built-in: {', '.join(sorted(BUILTIN_LORAS))})")

    def write(folder: Path) -> None:
        folder.mkdir()
        build(spec, folder / SINGLE_FILE_NAME)

    return _builtin.keep(
        air,
        cache,
        in_use,
        write,
        layout=Layout.SINGLE_FILE,
        metadata={"source": "builtin", "name": spec.name, "version": spec.version},
        detect=identify_file,
    )
