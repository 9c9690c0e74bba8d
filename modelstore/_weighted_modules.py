"""A pipeline's weight-bearing modules (UNet, VAE, text encoders) built from tensors read once (issue 19).

The libraries' own loaders open the weight files themselves (safetensors maps them), so handing them a path
means a second read after the check. Here each weight file is read once (`_tensor_file`, hashed on the way
when its check is owed) and the modules are built from those tensors with the libraries' own code for tensors
in memory:

- a diffusers folder: the UNet and VAE are made on the meta device from their configs and take the tensors as
  their parameters (`load_state_dict(assign=True)`: no copy), after the key renames `from_pretrained` applies;
  the text encoders go through transformers' `from_pretrained(state_dict=...)`;
- a single file in the original layout: diffusers' own per-component single-file loader
  (`load_single_file_sub_model`, what `from_single_file` calls for each component) with the checkpoint given
  as tensors instead of a path.

A tensor missing from the weights stays on the meta device, where `_pipeline_checks` finds it and names it, as
it does after diffusers' loaders; tensors that fit nothing are logged and left out, as diffusers does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from modelstore._folder_weights import component_files
from modelstore.components import single_file_prefixes
from modelstore.errors import CorruptModel

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The components that carry weights, in the order they are read.
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")
_EXAMPLES = 3


class ReadTensors(Protocol):
    """Read the file at `path` once; the tensors whose key `keep` accepts."""

    def __call__(self, path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]: ...


def weighted_in(config_folder: Path) -> list[str]:
    """The weight-bearing components the pipeline in `config_folder` (its model_index.json) has."""
    try:
        index = json.loads((config_folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptModel(
            f"{config_folder.name} has no readable model_index.json ({exc.__class__.__name__})"
        ) from None
    return [name for name in WEIGHTED if isinstance(index.get(name), list) and index[name][:1] != [None]]


def folder_modules(folder: Path, wanted: Sequence[str], dtype: Any, read: ReadTensors) -> dict[str, Any]:
    """The `wanted` components of the diffusers folder `folder`, each from its weight files read once."""
    index = json.loads((folder / "model_index.json").read_text())
    modules = {}
    for name in wanted:
        library, class_name = index[name][:2]
        tensors: dict[str, torch.Tensor] = {}
        for path in component_files(folder, name):
            tensors.update(read(path, lambda _key: True))
        cls = _class(library, class_name, name)
        build = _diffusers_model if library == "diffusers" else _transformers_model
        modules[name] = build(cls, folder / name, tensors, dtype)
    return modules


def single_file_modules(
    path: Path, config: Path, wanted: Sequence[str], dtype: Any, read: ReadTensors, *, keys: Sequence[str]
) -> dict[str, Any]:
    """The `wanted` components of the single file at `path` (original key layout; `keys`, its tensors' names
    from its header), with the configs in `config`, from one read of the file. Tensors of components not
    wanted (held by another model) are read for the check and dropped."""
    from diffusers import pipelines
    from diffusers.loaders.single_file import load_single_file_sub_model

    prefixes = single_file_prefixes(keys)
    unwanted = tuple(prefix for prefix, name in prefixes.items() if name not in wanted)
    checkpoint = read(path, lambda key: not key.startswith(unwanted))
    index = json.loads((config / "model_index.json").read_text())
    modules = {}
    for name in wanted:
        library, class_name = index[name][:2]
        modules[name] = load_single_file_sub_model(
            library_name=library,
            class_name=class_name,
            name=name,
            checkpoint=checkpoint,
            pipelines=pipelines,
            is_pipeline_module=False,
            cached_model_config_path=str(config),
            torch_dtype=dtype,
            local_files_only=True,
        )
    return modules


def _class(library: str, class_name: str, name: str) -> Any:
    import importlib

    if library not in ("diffusers", "transformers"):
        raise CorruptModel(f"{name} is a {library}.{class_name}, which is not loaded")
    try:
        return getattr(importlib.import_module(library), class_name)
    except AttributeError:
        raise CorruptModel(f"{name} is a {library}.{class_name}, which {library} does not have") from None


def _diffusers_model(cls: Any, folder: Path, tensors: dict[str, torch.Tensor], dtype: Any) -> Any:
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(cls.load_config(str(folder)))
    model._fix_state_dict_keys_on_load(tensors)  # attention keys saved before diffusers 0.14, as from_pretrained
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        log.warning(
            "%s: %d tensors fit no parameter of %s and were not loaded (e.g. %s)",
            folder.name,
            len(unexpected),
            cls.__name__,
            ", ".join(unexpected[:_EXAMPLES]),
        )
    if dtype is not None:
        # The tensors are in `dtype` already; this casts only what was built from the config (buffers).
        # torch's own `to`: diffusers' override warns about fp32 modules these models do not have.
        torch.nn.Module.to(model, dtype=dtype)
    model.register_to_config(_name_or_path=str(folder))
    return model.eval()


def _transformers_model(cls: Any, folder: Path, tensors: Mapping[str, torch.Tensor], dtype: Any) -> Any:
    config = cls.config_class.from_pretrained(str(folder), local_files_only=True)
    return cls.from_pretrained(None, config=config, state_dict=dict(tensors), dtype=dtype).eval()
