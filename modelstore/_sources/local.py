"""Local models: `local:/abs/path` or `/abs/path`, a diffusers folder or a single .safetensors file,
registered by reference. Nothing is copied (a local model is the user's, and may be large); the store only
checks it (safetensors by content, every weight file), hashes it once, and remembers each file's size and
mtime so later lookups re-hash only files that changed. It is never counted in the quota and never evicted;
deleting it from the store forgets it and leaves the files alone.

`register` checks a model and records it in the index; `fingerprint_matches` tells a later lookup whether the
files are still the ones registered."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelstore._architecture import detect_file, detect_folder
from modelstore._blobs import check_safetensors
from modelstore._cache import Cache
from modelstore._digests import sha256_digest
from modelstore._index import IndexEntry
from modelstore._snapshots import content_digest
from modelstore.air import AIR, Source
from modelstore.errors import ModelNotFound, UnsafeCheckpoint
from modelstore.progress import ByteCounter, ProgressFanout
from modelstore.record import Architecture, Layout, ModelRecord

log = logging.getLogger(__name__)

_WEIGHTED = ("text_encoder", "text_encoder_2", "unet", "vae")
_LOADED_SUFFIXES = {".json", ".txt", ".model", ".safetensors"}


@dataclass(frozen=True)
class LocalModel:
    path: Path
    layout: Layout
    architecture: Architecture
    sha256: str
    size_bytes: int
    # relative path -> [size, mtime_ns, sha256]: what the next lookup compares against
    fingerprint: Mapping[str, list[Any]]


def fingerprint_matches(path: Path, fingerprint: Mapping[str, list[Any]]) -> bool:
    """Whether the files under `path` are still the ones hashed before (sizes and mtimes only: no hashing)."""
    try:
        current = _stat_files(path)
    except FileNotFoundError:
        return False
    return current.keys() == fingerprint.keys() and all(list(current[p]) == list(fingerprint[p][:2]) for p in current)


def register(air: AIR, cache: Cache, progress: ProgressFanout) -> ModelRecord:
    """Check the local model `air` names, hash what changed since it was last registered, and record it in
    `cache`'s index; `progress` hears the hashing (seconds for gigabytes) as VERIFYING progress."""
    path = Path(air.id)
    old = cache.index.get(air.canonical)
    previous = old.metadata.get("fingerprint", {}) if old is not None else {}
    progress.set_verifying()
    model = inspect(path, previous, progress)
    progress.finish()
    now = time.time()
    cache.register_local(
        IndexEntry(
            air=air.canonical,
            source=Source.LOCAL.value,
            layout=model.layout,
            architecture=model.architecture,
            path=str(path),
            sha256=model.sha256,
            size_bytes=model.size_bytes,
            metadata={"source": "local", "fingerprint": dict(model.fingerprint)},
            added=now,
            last_used=now,
            pinned=False,
        )
    )
    log.info("registered local model %s (%s)", path, model.architecture.label)
    return ModelRecord(air, path, model.layout, model.architecture, model.size_bytes, model.sha256)


def inspect(path: Path, previous: Mapping[str, list[Any]], counter: ByteCounter | None = None) -> LocalModel:
    """Check and describe the model at `path`, re-using hashes of files unchanged since `previous`;
    `counter` hears how many bytes must be hashed and how far hashing has got."""
    if not path.exists():
        raise ModelNotFound(f"{path} does not exist")
    if not path.is_file() and not path.is_dir():
        raise ModelNotFound(f"{path} is neither a file nor a folder")
    if path.is_dir():
        detect_folder(path)  # raises ModelNotFound unless it is a diffusers folder
    files = _stat_files(path)
    for relative in files:
        if relative == "" or relative.endswith(".safetensors"):
            check_safetensors(path / relative if relative else path, relative or path.name)
    if path.is_dir():
        _check_components(path, files)

    def unchanged(relative: str, size: int, mtime_ns: int) -> bool:
        old = previous.get(relative)
        return old is not None and old[0] == size and old[1] == mtime_ns

    if counter is not None:
        counter.set_total(sum(size for r, (size, mtime) in files.items() if not unchanged(r, size, mtime)))
    fingerprint: dict[str, list[Any]] = {}
    for relative, (size, mtime_ns) in files.items():
        if unchanged(relative, size, mtime_ns):
            sha256 = previous[relative][2]
        else:
            sha256 = sha256_digest(path / relative if relative else path, counter)
        fingerprint[relative] = [size, mtime_ns, sha256]
    if path.is_file():
        layout, architecture, digest = Layout.SINGLE_FILE, detect_file(path), fingerprint[""][2]
    else:
        layout, architecture = Layout.DIFFUSERS, detect_folder(path)
        digest = content_digest({p: v[2] for p, v in fingerprint.items()})
    size = sum(v[0] for v in fingerprint.values())
    return LocalModel(path, layout, architecture, digest, size, fingerprint)


def _check_components(folder: Path, files: Mapping[str, object]) -> None:
    for component in _WEIGHTED:
        if (folder / component).is_dir() and not any(
            p.startswith(f"{component}/") and p.endswith(".safetensors") for p in files
        ):
            raise UnsafeCheckpoint(
                f"{folder}: {component}/ has no safetensors weights (pickled weights are never loaded)"
            )


def _stat_files(path: Path) -> dict[str, tuple[int, int]]:
    """relative path ("" for a single file) -> (size, mtime_ns) of the files the loader reads.

    For a folder: model_index.json and the configs, tokenizer files and safetensors weights of its component
    folders; pickled weights, ONNX/Flax exports, hidden folders (.git, huggingface_hub's .cache) and loose
    checkpoints next to the components are not part of what is loaded, so they are not hashed."""
    if path.is_file():
        st = path.stat()
        return {"": (st.st_size, st.st_mtime_ns)}
    files = {}
    index = path / "model_index.json"
    st = index.stat()
    files["model_index.json"] = (st.st_size, st.st_mtime_ns)
    for component in sorted(path.iterdir()):
        if component.name.startswith(".") or not component.is_dir():
            continue
        for file in sorted(component.iterdir()):
            if file.suffix in _LOADED_SUFFIXES and file.is_file():
                st = file.stat()
                files[f"{component.name}/{file.name}"] = (st.st_size, st.st_mtime_ns)
    return files
