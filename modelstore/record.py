"""What the store knows about a model once it is resolved: values, no behaviour (but for the checks a record's
weight files may still owe, which the store hands to the one read that loads them: `WeightChecks`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Protocol

from modelstore.air import AIR


class Architecture(Enum):
    """Model families, as read from the weights themselves (never trusted from names)."""

    SDXL_BASE = "sdxl-base"
    SDXL_REFINER = "sdxl-refiner"
    # SDXL base's structure with a 9-channel UNet input (latent, mask, masked image's latent): a base for
    # inpainting only (diffusers/stable-diffusion-xl-1.0-inpainting-0.1).
    SDXL_INPAINT = "sdxl-inpaint"
    SD1 = "sd1"
    SD2 = "sd2"
    SD3 = "sd3"
    FLUX = "flux"
    UNKNOWN = "unknown"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Architecture.SDXL_BASE: "SDXL base",
    Architecture.SDXL_REFINER: "SDXL refiner",
    Architecture.SDXL_INPAINT: "SDXL inpainting",
    Architecture.SD1: "Stable Diffusion 1.x",
    Architecture.SD2: "Stable Diffusion 2.x",
    Architecture.SD3: "Stable Diffusion 3",
    Architecture.FLUX: "FLUX",
    Architecture.UNKNOWN: "an unrecognised architecture",
}


class ModelKind(Enum):
    """What a file of weights is: a whole model, or a LoRA that adapts one (read from its keys, like the
    architecture)."""

    CHECKPOINT = "checkpoint"
    LORA = "lora"


class Layout(Enum):
    """How the weights are laid out on disk."""

    DIFFUSERS = "diffusers"  # a folder with model_index.json and one subfolder per component
    SINGLE_FILE = "single-file"  # one .safetensors in the original (civitai / sgm) key layout


@dataclass(frozen=True)
class FileId:
    """What a file was when it was opened: its identity and the two facts that tell a change."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class LocalFiles:
    """A local model's files as they were checked and hashed (relative path, "" for a single file, and
    identity), and the roots it was confined to: what loading it must open again (`local_files.reading`)."""

    ids: tuple[tuple[str, FileId], ...]
    roots: tuple[Path, ...] = ()


class WeightChecks(Protocol):
    """The fast-digest checks that a cached model's weight files still owe this process, left by the store to
    the read that loads them (`modelstore.loading`: issue 19, one read at start). Files are named by their path
    inside the model's folder; `opened` is the fstat of the file as the load opened it."""

    def owed(self, relative: str, opened: os.stat_result) -> bool:
        """Whether the load must hash its read of this file (its check is still owed)."""
        ...

    def settle(self, relative: str, opened: os.stat_result, digest: str) -> str | None:
        """The verdict on one whole read of the file, whose XXH3-128 was `digest`: None when it is the file
        that entered the cache; otherwise what is wrong, the file set aside as a failed check sets it."""
        ...

    def settle_rest(self) -> str | None:
        """Check every owed file the load did not settle (not read by it, or not to the end); what is wrong
        (those files set aside), or None."""
        ...

    def repaired(self, damage: str) -> ModelRecord:
        """After `damage` (from `settle`, `settle_rest`): the model fetched again where its source allows, as
        `ModelStore.resolve` does for a file that fails its check; IntegrityError where it may not be."""
        ...


@dataclass(frozen=True)
class ModelRecord:
    """A model that is available locally and can be loaded without the network."""

    air: AIR
    path: Path  # the diffusers folder or the .safetensors file
    layout: Layout
    architecture: Architecture
    size_bytes: int
    # Content hash of the weights (sha256 of the file, or of the folder's sorted file hashes).
    sha256: str
    # A LoRA is one .safetensors file (SINGLE_FILE); its `architecture` is the model it was trained on.
    kind: ModelKind = ModelKind.CHECKPOINT
    # Words a LoRA was trained to respond to, as its source lists them (civitai's trainedWords).
    trigger_words: tuple[str, ...] = ()
    # A local model's checked files (None for the cache's own, and for a record nobody checked).
    local: LocalFiles | None = field(default=None, compare=False, repr=False)
    # Checks its weight files still owe, for the read that loads them (None: none are owed, or nobody said).
    weight_checks: WeightChecks | None = field(default=None, compare=False, repr=False)

    @property
    def canonical(self) -> str:
        return self.air.canonical

    @property
    def is_lora(self) -> bool:
        return self.kind is ModelKind.LORA


@dataclass(frozen=True)
class CachedModel:
    """One row of `ModelStore.list_models()`."""

    air: str
    source: str
    layout: Layout
    architecture: Architecture
    size_bytes: int
    added: datetime
    last_used: datetime
    pinned: bool
    in_use: bool
    path: Path
    sha256: str  # of the file, or of the folder's files (see `_snapshots.content_digest`)
    kind: ModelKind = ModelKind.CHECKPOINT
    trigger_words: tuple[str, ...] = ()


class Verdict(Enum):
    """What `ModelStore.verify` found for one model."""

    INTACT = "intact"  # every file's SHA256 matches the name it is stored under
    REPAIRED = "repaired"  # a file did not; it was quarantined, and the model fetched again and verified
    CORRUPT = "corrupt"  # a file did not; it was quarantined, and the model could not be fetched again
    SKIPPED = "skipped"  # a local model: the operator's files, not the cache's


@dataclass(frozen=True)
class Verification:
    """One model's result from `ModelStore.verify`."""

    model: str  # canonical AIR
    verdict: Verdict
    bytes_checked: int
    message: str  # what was wrong and what was done ("" when intact)
