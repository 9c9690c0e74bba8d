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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from modelstore import _model_dims
from modelstore._architecture import detect_folder, detect_header
from modelstore._config_families import family_for, known_families
from modelstore._load_reads import LoadReads, WeightsDamaged
from modelstore._pipeline_checks import check_pipeline
from modelstore._safetensors_header import SafetensorsHeader, read_header
from modelstore._weighted_modules import folder_modules, single_file_modules, weighted_in
from modelstore.errors import CorruptModel, IntegrityError, ModelStoreError, concerning
from modelstore.local_files import reading
from modelstore.record import Architecture, Layout, ModelRecord
from modelstore.role import Role
from modelstore.role_policy import require_architecture, require_role
from modelstore.units import format_bytes

log = logging.getLogger(__name__)

# Loads of one record: the first, and one after the store fetched again files that failed their check.
_FETCHES = 2


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
    known configuration. A weight file that fails the check its record still owes (`record.weight_checks`)
    was set aside: the model is fetched again and loaded from the new files where its source allows, else
    IntegrityError; nothing built from the failed file is ever returned.
    """
    started = time.perf_counter()
    with concerning(record.canonical):
        pipe, architecture, reads = _load_checked(
            record, Role(role), preferred_dtype(device) if dtype is None else dtype, components
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "loaded %s (%s, %s) as %s on %s in %.2f s (weights read once: %s, %s of it checked)",
        record.canonical,
        architecture.label,
        record.layout.value,
        role,
        device,
        time.perf_counter() - started,
        format_bytes(reads.bytes_read),
        format_bytes(reads.hashed),
    )
    return pipe


def _load_checked(
    record: ModelRecord, role: Role, dtype: Any, components: Mapping[str, Any] | None
) -> tuple[Any, Architecture, LoadReads]:
    """`_load`, and where a check the record owed fails (or explains a failure: a damaged header reads as a
    malformed file), the model fetched again by the store and loaded once more."""
    for _ in range(_FETCHES):
        checks = record.weight_checks
        damage: str | None
        try:
            return _load(record, role, dtype, components)
        except WeightsDamaged as damaged:
            damage = damaged.damage
        except ModelStoreError:
            damage = None if checks is None else checks.settle_rest()
            if damage is None:
                raise
        assert checks is not None  # only a record that owed checks can be damaged here
        record = checks.repaired(damage)
    raise IntegrityError(
        f"{record.canonical}: its files failed their check again after being fetched {_FETCHES - 1} times",
        air=record.canonical,
    )


def _load(
    record: ModelRecord, role: Role, dtype: Any, components: Mapping[str, Any] | None
) -> tuple[Any, Architecture, LoadReads]:
    if record.is_lora:
        require_role(record, role)  # a LoRA is no pipeline: refused before anything is read
    # A local model is read through what was opened and matched against its check, for the whole load: a
    # name swapped for a link meanwhile cannot lead diffusers elsewhere (issue 21, item 5).
    with reading(record) as path:
        if record.layout is Layout.DIFFUSERS:
            architecture = detect_folder(path)
            _require_role(record, architecture, role)
            build = _Build(record.canonical, role, architecture, dtype, components)
            reads = LoadReads(path, record.weight_checks, dtype)
            wanted = [name for name in weighted_in(path) if name not in (components or {})]
            modules = _diffusers_call(build.name, lambda: folder_modules(path, wanted, dtype, reads))
            reads.settle_rest()  # every verdict is in before a pipeline exists
            return build.assemble(path, modules), architecture, reads
        header = _single_file_header(path)
        architecture = detect_header(header, name=record.canonical)
        _require_role(record, architecture, role)
        build = _Build(record.canonical, role, architecture, dtype, components)
        reads = LoadReads(path.parent, record.weight_checks, dtype)
        return _from_single_file(path, header, build, reads), architecture, reads


def load_single_file(path: Path, *, config: Path, role: Role, dtype: Any) -> Any:
    """Load a single-file checkpoint on the CPU with an explicit config folder, checked like `load_pipeline`.

    For callers that bring their own configs (e.g. a fine-tune with a v-prediction scheduler); `load_pipeline`
    chooses the config folder itself.
    """
    role = Role(role)
    header = _single_file_header(path)
    architecture = detect_header(header, name=path.name)
    require_architecture(architecture, role, name=path.name)
    build = _Build(path.name, role, architecture, dtype)
    return _load_with_config(path, header, config, build, LoadReads(path.parent, None, dtype))


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

    def assemble(self, folder: Path, modules: Mapping[str, Any]) -> Any:
        """The pipeline class from `folder`'s configs, tokenizers and scheduler, with every weight-bearing module
        given (`modules` built from one read, and those reused): diffusers loads no weights itself. Checked."""
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if self.role == Role.BASE else StableDiffusionXLImg2ImgPipeline
        kwargs = {**self._kwargs(), **modules}
        # use_safetensors: should a weighted module ever be missing here, diffusers must not unpickle its .bin.
        pipe = _diffusers_call(self.name, lambda: cls.from_pretrained(str(folder), use_safetensors=True, **kwargs))
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
        raise CorruptModel(f"{path} is not a file")
    return read_header(path)  # refuses pickles and anything else that is not safetensors, by content


def _from_single_file(path: Path, header: SafetensorsHeader, build: _Build, reads: LoadReads) -> Any:
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
    return _load_with_config(path, header, family.folder, build, reads)


def _load_with_config(path: Path, header: SafetensorsHeader, config: Path, build: _Build, reads: LoadReads) -> Any:
    # The file is read here, whatever its name: diffusers, which picks its reader by name and would torch.load
    # (unpickle) anything not named .safetensors, is handed tensors, never the file.
    wanted = [name for name in weighted_in(config) if name not in (build.reuse or {})]
    keys = list(header.tensors)
    modules = _diffusers_call(
        build.name, lambda: single_file_modules(path, config, wanted, build.dtype, reads, keys=keys)
    )
    reads.settle_rest()  # every verdict is in before a pipeline exists
    return build.assemble(config, modules)


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
