"""Config-only diffusers folders for single-file checkpoints, chosen by the checkpoint's own shapes.

A civitai checkpoint is only weights; diffusers needs a diffusers-format folder of configs and tokenizers as
`config=` to build the pipeline around them, or it goes to the Hub (shared/research/single-file.md P7). Each
known family is such a folder plus the dimensions its configs promise (`_model_dims.from_configs`); a
checkpoint gets the family whose dimensions equal its header's, so the folder is never guessed from a name.

- Real SDXL base and refiner: `modelstore/configs/sdxl_base|sdxl_refiner`, shipped with the package.
- Real SDXL inpainting (diffusers/stable-diffusion-xl-1.0-inpainting-0.1, and fine-tunes of it as civitai
  files): the shipped base configs with a 9-channel UNet input, written on first use like the tiny ones (its
  configs differ from the base's only there, so the package does not carry a second copy of the tokenizers).
- The tiny built-in models: written on first use by `_builtin.write_config_folder` into a temporary folder
  that lives as long as the process. Generated rather than shipped so that the weights (`_builtin.build`) and
  their configs come from one definition and cannot drift apart, and the wheel does not carry a second copy of
  the 1.5 MB tokenizer files per model; writing them takes milliseconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from modelstore import _builtin, _model_dims
from modelstore._architecture import INPAINT_CHANNELS
from modelstore._model_dims import ModelDims
from modelstore.record import Architecture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigFamily:
    name: str
    architecture: Architecture
    folder: Path  # a diffusers folder without weights: model_index.json, configs, tokenizers, scheduler
    dims: ModelDims


_lock = threading.Lock()
_families: tuple[ConfigFamily, ...] | None = None
_generated: tempfile.TemporaryDirectory[str] | None = None  # removed when the process exits


def known_families() -> tuple[ConfigFamily, ...]:
    """Every family a single-file checkpoint can be loaded as (real SDXL first, then the built-in models)."""
    global _families, _generated
    with _lock:
        if _families is None:
            families = [
                _family("SDXL base 1.0", Architecture.SDXL_BASE, _builtin.CONFIG_ROOT / "sdxl_base"),
                _family("SDXL refiner 1.0", Architecture.SDXL_REFINER, _builtin.CONFIG_ROOT / "sdxl_refiner"),
            ]
            _generated = tempfile.TemporaryDirectory(prefix="refinery-configs-")
            inpaint = _inpainting_configs(_builtin.CONFIG_ROOT / "sdxl_base", Path(_generated.name) / "sdxl_inpaint")
            families.append(_family("SDXL inpainting 0.1", Architecture.SDXL_INPAINT, inpaint))
            for spec in _builtin.BUILTIN_MODELS.values():
                folder = Path(_generated.name) / f"{spec.name}@{spec.version}"
                _builtin.write_config_folder(spec, folder)
                families.append(_family(spec.air, spec.architecture, folder))
            log.debug("config families ready: %s", ", ".join(f.name for f in families))
            _families = tuple(families)
        return _families


def _inpainting_configs(base: Path, dest: Path) -> Path:
    """SDXL base's configs with a 9-channel UNet input: the only difference of diffusers/stable-diffusion-xl-
    1.0-inpainting-0.1's configs from the base's that a load reads (its model_index.json names the inpainting
    pipeline; the loader chooses the pipeline class itself)."""
    shutil.copytree(base, dest)
    config = dest / "unet" / "config.json"
    unet = json.loads(config.read_text())
    unet["in_channels"] = INPAINT_CHANNELS
    config.write_text(json.dumps(unet, indent=2, sort_keys=True) + "\n")
    return dest


def _family(name: str, architecture: Architecture, folder: Path) -> ConfigFamily:
    return ConfigFamily(name, architecture, folder, _model_dims.from_configs(folder))


def family_for(dims: ModelDims, architecture: Architecture) -> ConfigFamily | None:
    """The family whose configs fit a checkpoint of `dims` exactly, or None."""
    for family in known_families():
        if family.architecture is architecture and family.dims == dims:
            return family
    return None
