"""Build diffusers pipelines from records in the cache, with no network access, and check them.

Two layouts load:

- a diffusers folder: `from_pretrained(folder, local_files_only=True, use_safetensors=True)`;
- a single file in the original (civitai / sgm) key layout: `from_single_file(path, config=<folder>)`, where
  the config folder is chosen by the checkpoint's header (`_config_families`) and is always local,
  because without it diffusers goes to the Hub even with `local_files_only=True` (shared/research/
  single-file.md P7).

Before anything reaches diffusers, every weight file is checked to be safetensors by its content (diffusers
would `torch.load` any file not named `.safetensors`) and the architecture is read from the headers, so a
model that cannot serve the role is refused with WrongArchitecture before any tensor is read. A local model
is read, for the whole load, through its files as they were opened and matched against what was checked and
hashed (`local_files.reading`), never through its names. After loading,
`_pipeline_checks` looks for what diffusers gets wrong silently (meta tensors, broken tokenizers, the
aesthetics flag) and raises CorruptModel.

Precision: `dtype` is passed explicitly every time (transformers 5 would otherwise keep the file's dtype,
single-file.md P10): float16 on CUDA, float32 elsewhere unless the caller says otherwise. SDXL's VAE overflows
in float16; its config has `force_upcast`, and the pipelines then decode in float32 themselves. That switch
flips the shared VAE's dtype during each decode, so two pipelines sharing one VAE must not decode at once:
the server runs one job at a time per device.

Only this module and the server's two-stage runner talk to diffusers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from modelstore import _model_dims
from modelstore._architecture import detect_folder, detect_header
from modelstore._config_families import family_for, known_families
from modelstore._pipeline_checks import check_pipeline
from modelstore._safetensors_header import SafetensorsHeader, read_header
from modelstore.errors import CorruptModel, ModelStoreError, concerning
from modelstore.local_files import reading
from modelstore.record import Architecture, Layout, ModelRecord
from modelstore.role import Role
from modelstore.role_policy import require_architecture, require_role

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"


class Loader(Protocol):
    """Builds a pipeline for a record on a device: `load_pipeline`, or a test's stand-in."""

    def __call__(
        self,
        record: ModelRecord,
        *,
        role: Role,
        device: str,
        dtype: Any = None,
        components: Mapping[str, Any] | None = None,
    ) -> Any: ...


def preferred_dtype(device: str) -> Any:
    """float16 on CUDA (SDXL's released precision), float32 elsewhere (CPU float16 is slow and lossy)."""
    import torch

    return torch.float16 if str(device).startswith("cuda") else torch.float32


def load_pipeline(
    record: ModelRecord, *, role: Role, device: str, dtype: Any = None, components: Mapping[str, Any] | None = None
) -> Any:
    """A checked StableDiffusionXLPipeline (`Role.BASE`) or StableDiffusionXLImg2ImgPipeline (`Role.REFINER`).

    An SDXL inpainting model loads as a base like any other: its UNet reads 9 channels
    (`unet.config.in_channels`), and the caller builds diffusers' inpainting pipeline from its components.

    `dtype` None means `preferred_dtype(device)`. `components` are modules already on `device` to use instead
    of loading those parts (e.g. the VAE and OpenCLIP encoder a refiner shares with its base); the caller
    vouches that they hold the same weights. Raises WrongArchitecture when the weights cannot serve `role`,
    UnsafeCheckpoint for anything but safetensors, CorruptModel when the weights are incomplete or match no
    known configuration.
    """
    started = time.perf_counter()
    with concerning(record.canonical):
        pipe, architecture = _load(record, Role(role), preferred_dtype(device) if dtype is None else dtype, components)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "loaded %s (%s, %s) as %s on %s in %.2f s",
        record.canonical,
        architecture.label,
        record.layout.value,
        role,
        device,
        time.perf_counter() - started,
    )
    return pipe


def _load(
    record: ModelRecord, role: Role, dtype: Any, components: Mapping[str, Any] | None
) -> tuple[Any, Architecture]:
    if record.is_lora:
        require_role(record, role)  # a LoRA is no pipeline: refused before anything is read
    # A local model is read through what was opened and matched against its check, for the whole load: a
    # name swapped for a link meanwhile cannot lead diffusers elsewhere (issue 21, item 5).
    with reading(record) as path:
        if record.layout is Layout.DIFFUSERS:
            architecture = detect_folder(path)
            _require_role(record, architecture, role)
            build = _Build(record.canonical, role, architecture, dtype, components)
            return build.load("from_pretrained", path, use_safetensors=True), architecture  # never .bin
        header = _single_file_header(path)
        architecture = detect_header(header, name=record.canonical)
        _require_role(record, architecture, role)
        build = _Build(record.canonical, role, architecture, dtype, components)
        return _from_single_file(path, header, build), architecture


def load_single_file(path: Path, *, config: Path, role: Role, dtype: Any) -> Any:
    """Load a single-file checkpoint on the CPU with an explicit config folder, checked like `load_pipeline`.

    For callers that bring their own configs (e.g. a fine-tune with a v-prediction scheduler); `load_pipeline`
    chooses the config folder itself.
    """
    role = Role(role)
    header = _single_file_header(path)
    architecture = detect_header(header, name=path.name)
    require_architecture(architecture, role, name=path.name)
    return _load_with_config(path, config, _Build(path.name, role, architecture, dtype))


def _require_role(record: ModelRecord, architecture: Architecture, role: Role) -> None:
    if architecture is not record.architecture:
        log.warning(
            "%s was recorded as %s but its weights read as %s now",
            record.canonical,
            record.architecture.label,
            architecture.label,
        )
    require_role(dataclasses.replace(record, architecture=architecture), role)


@dataclasses.dataclass(frozen=True)
class _Build:
    """How to build one pipeline: its name for messages, the role, the architecture read from the weights, the
    dtype, and modules already loaded to use as they are."""

    name: str
    role: Role
    architecture: Architecture
    dtype: Any
    reuse: Mapping[str, Any] | None = None

    def load(self, method: str, path: Path, **extra: Any) -> Any:
        """The pipeline class's `method` (from_pretrained, from_single_file) on `path`, checked."""
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if self.role == Role.BASE else StableDiffusionXLImg2ImgPipeline
        kwargs = {**self._kwargs(), **extra}
        pipe = _diffusers_call(self.name, lambda: getattr(cls, method)(str(path), **kwargs))
        check_pipeline(pipe, name=self.name, role=self.role, architecture=self.architecture)
        return pipe

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            # Passed components are used as they are and not loaded again (diffusers' documented way to share a
            # VAE or text encoder between pipelines).
            **(self.reuse or {}),
            "dtype": self.dtype,
            "local_files_only": True,
            "add_watermarker": False,
            # SDXL pipelines can carry an IP-Adapter image encoder; the service never uses one, so never load one.
            "image_encoder": None,
            "feature_extractor": None,
        }
        if self.role == Role.REFINER:
            # From the weights, not the config: a refiner's 5 time ids need the flag, and a base serving as
            # refiner (6 time ids) must not have it (P9). Only the img2img pipeline takes this argument.
            kwargs["requires_aesthetics_score"] = self.architecture is Architecture.SDXL_REFINER
        return kwargs


def _single_file_header(path: Path) -> SafetensorsHeader:
    if not path.is_file():
        # diffusers would take a missing path for a Hub repository id and try to download it.
        raise CorruptModel(f"{path} is not a file")
    return read_header(path)  # refuses pickles and anything else that is not safetensors, by content


def _from_single_file(path: Path, header: SafetensorsHeader, build: _Build) -> Any:
    dims = _model_dims.from_single_file(header.tensors)
    if dims.bigg is None or dims.unet is None or dims.vae is None:
        # diffusers cannot build the missing parts from configs alone (single-file.md P11).
        missing = [
            part
            for part, value in (("UNet", dims.unet), ("VAE", dims.vae), ("text encoders", dims.bigg))
            if value is None
        ]
        raise CorruptModel(f"{build.name} has no {' and no '.join(missing)}; only complete checkpoints are loaded")
    architecture = build.architecture
    family = family_for(dims, architecture)
    if family is None:
        known = "; ".join(f"{f.name}: {f.dims.describe()}" for f in known_families() if f.architecture is architecture)
        raise CorruptModel(
            f"{build.name} is {architecture.label} by its header but fits no known configuration "
            f"({dims.describe()}); known: {known}"
        )
    log.debug("%s: loading with the %s configs from %s", build.name, family.name, family.folder)
    return _load_with_config(path, family.folder, build)


def _load_with_config(path: Path, config: Path, build: _Build) -> Any:
    if path.name.endswith(_SUFFIX):
        return build.load("from_single_file", path, config=str(config))
    # diffusers chooses its reader by file name and would torch.load (unpickle) anything not named
    # .safetensors; a cache blob named by its hash is read through a correctly named link instead.
    with tempfile.TemporaryDirectory(prefix="refinery-load-") as tmp:
        link = Path(tmp) / f"checkpoint{_SUFFIX}"
        link.symlink_to(path.resolve())
        return build.load("from_single_file", link, config=str(config))


def _diffusers_call(name: str, load: Any) -> Any:
    # diffusers reports checkpoints it cannot assemble as ValueError/KeyError/OSError with internals in the
    # text; the caller gets one modelstore error that names the model instead.
    try:
        return load()
    except NotImplementedError as exc:
        if "meta tensor" not in str(exc):
            raise
        # A UNet or VAE tensor missing from the file stays on the meta device (P2); with an explicit dtype
        # diffusers then fails to cast it, without naming it.
        raise CorruptModel(
            f"{name} lacks UNet or VAE tensors that its configuration needs (left on the meta device)"
        ) from exc
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise CorruptModel(f"{name} could not be loaded: {exc.__class__.__name__}: {exc}") from exc


def native_size(record: ModelRecord) -> tuple[int, int] | None:
    """The model's training resolution as (width, height), read from its configs without touching a weight
    (1024x1024 for SDXL, 64x64 for the built-in tiny models); None if the configs do not say."""
    try:
        with reading(record) as path:
            if record.layout is Layout.DIFFUSERS:
                folder = path
            else:
                dims = _model_dims.from_single_file(_single_file_header(path).tensors)
                family = family_for(dims, record.architecture)
                if family is None:
                    return None
                folder = family.folder
            unet = json.loads((folder / "unet" / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
        side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError, ModelStoreError):
        return None
    return side, side
