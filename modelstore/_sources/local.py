"""Local models: `local:/abs/path` or `/abs/path`, a diffusers folder or a single .safetensors file,
registered by reference. Nothing is copied (a local model is the user's, and may be large); the store only
checks it (safetensors by content, every weight file), hashes it once, and remembers each file's size and
mtime so later lookups re-hash only files that changed. Its files are opened once each, along one
resolution of their names, and read only through what was opened (`local_files`); a file is known by its
device and inode as well as its size and mtime. It is never counted in the quota and never evicted;
deleting it from the store forgets it and leaves the files alone.

`register` checks a model and records it in the index; `fingerprint_matches` tells a later lookup whether the
files are still the ones registered."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelstore._architecture import Identity, detect_folder, identify_file
from modelstore._blobs import check_safetensors
from modelstore._cache import Cache, with_kind
from modelstore._digests import sha256_digest
from modelstore._index import IndexEntry
from modelstore._snapshots import content_digest
from modelstore.air import AIR, Source
from modelstore.errors import ModelNotFound, UnsafeCheckpoint
from modelstore.local_files import Opened, checked, identities, open_model
from modelstore.progress import ByteCounter, ProgressFanout
from modelstore.record import Architecture, FileId, Layout, ModelKind, ModelRecord

log = logging.getLogger(__name__)

_WEIGHTED = ("text_encoder", "text_encoder_2", "unet", "vae")


@dataclass(frozen=True)
class LocalModel:
    path: Path
    layout: Layout
    architecture: Architecture
    kind: ModelKind
    sha256: str
    size_bytes: int
    # relative path -> [size, mtime_ns, sha256]: what the next lookup compares against
    fingerprint: Mapping[str, list[Any]]


def fingerprint_matches(path: Path, fingerprint: Mapping[str, list[Any]], roots: Sequence[Path] = ()) -> bool:
    """Whether the files under `path` are still the ones hashed before: the same files (device and inode, as
    opened without following a changed name), sizes and mtimes. Nothing is read or hashed."""
    try:
        current = identities(path, roots)
    except (ModelNotFound, OSError):
        return False
    return current.keys() == fingerprint.keys() and all(_same(current[p], fingerprint[p]) for p in current)


def _same(now: FileId, recorded: list[Any]) -> bool:
    return [now.size, now.mtime_ns] == list(recorded[:2]) and [now.device, now.inode] == list(recorded[3:5])


def register(air: AIR, cache: Cache, progress: ProgressFanout, roots: Sequence[Path] = ()) -> ModelRecord:
    """Check the local model `air` names, hash what changed since it was last registered, and record it in
    `cache`'s index; `progress` hears the hashing (seconds for gigabytes) as VERIFYING progress. A model under
    one of `roots` may read nothing outside them (`local_files`)."""
    path = Path(air.id)
    old = cache.index.get(air.canonical)
    previous = old.metadata.get("fingerprint", {}) if old is not None else {}
    progress.set_verifying()
    model = inspect(path, previous, progress, roots)
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
            metadata=with_kind({"source": "local", "fingerprint": dict(model.fingerprint)}, model.kind),
            added=now,
            last_used=now,
            pinned=False,
        )
    )
    kind = " LoRA" if model.kind is ModelKind.LORA else ""
    log.info("registered local model %s (%s%s)", path, model.architecture.label, kind)
    record = ModelRecord(air, path, model.layout, model.architecture, model.size_bytes, model.sha256, model.kind)
    return checked(record, model.fingerprint, roots)  # what a load must find again (`local_files.reading`)


def inspect(
    path: Path, previous: Mapping[str, list[Any]], counter: ByteCounter | None = None, roots: Sequence[Path] = ()
) -> LocalModel:
    """Check and describe the model at `path`, re-using hashes of files unchanged since `previous`;
    `counter` hears how many bytes must be hashed and how far hashing has got. Every file is opened once
    (`local_files.open_model`) and everything here reads the opened files, never their names again."""
    if not os.path.lexists(path):
        raise ModelNotFound(f"{path} does not exist")
    with open_model(path, roots, confined=False) as opened, opened.view() as view:
        return _inspect(opened, view, previous, counter)


def _inspect(opened: Opened, view: Path, previous: Mapping[str, list[Any]], counter: ByteCounter | None) -> LocalModel:
    path, files = opened.path, opened.ids
    if not opened.is_file:
        _check_components(path, files)
        detect_folder(view)  # raises ModelNotFound unless it is a diffusers folder
    for relative in files:
        if relative == "" or relative.endswith(".safetensors"):
            check_safetensors(opened.fd_path(relative), relative or path.name)

    def unchanged(relative: str, now: FileId) -> bool:
        old = previous.get(relative)
        return old is not None and _same(now, old)

    if counter is not None:
        counter.set_total(sum(now.size for r, now in files.items() if not unchanged(r, now)))
    fingerprint: dict[str, list[Any]] = {}
    for relative, now in files.items():
        sha256 = previous[relative][2] if unchanged(relative, now) else sha256_digest(opened.fd_path(relative), counter)
        fingerprint[relative] = [now.size, now.mtime_ns, sha256, now.device, now.inode]
    if opened.is_file:
        layout, identity, digest = Layout.SINGLE_FILE, identify_file(view), fingerprint[""][2]
    else:
        layout, identity = Layout.DIFFUSERS, Identity(ModelKind.CHECKPOINT, detect_folder(view))
        digest = content_digest({p: v[2] for p, v in fingerprint.items()})
    size = sum(v[0] for v in fingerprint.values())
    return LocalModel(path, layout, identity.architecture, identity.kind, digest, size, fingerprint)


def _check_components(folder: Path, files: Mapping[str, object]) -> None:
    for component in _WEIGHTED:
        if (folder / component).is_dir() and not any(
            p.startswith(f"{component}/") and p.endswith(".safetensors") for p in files
        ):
            raise UnsafeCheckpoint(
                f"{folder}: {component}/ has no safetensors weights (pickled weights are never loaded)"
            )
