"""The model store's front door: turn an identifier into a `ModelRecord` that loads with no network."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from modelstore import builtin
from modelstore.air import AIR, Source, parse_air
from modelstore.architecture import detect_folder
from modelstore.errors import ModelNotFound, SourceUnavailable, WrongArchitecture
from modelstore.record import Architecture, Layout, ModelRecord
from modelstore.settings import StoreSettings

log = logging.getLogger(__name__)

# What each role accepts: any SDXL model can continue a latent as refiner (diffusers' own mixture-of-denoisers
# example uses the base for both), but only a base can start from noise.
ROLE_ARCHITECTURES = {
    "base": (Architecture.SDXL_BASE,),
    "refiner": (Architecture.SDXL_REFINER, Architecture.SDXL_BASE),
}


class ModelStore:
    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._records: dict[str, ModelRecord] = {}

    def resolve(self, model: str | AIR) -> ModelRecord:
        """The record of `model`, materialising it in the cache first if needed (blocking)."""
        air = parse_air(model) if isinstance(model, str) else model
        with self._key_lock(air.canonical):
            record = self._records.get(air.canonical)
            if record is None:
                record = self._materialise(air)
                self._records[air.canonical] = record
            return record

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _materialise(self, air: AIR) -> ModelRecord:
        if air.source is Source.BUILTIN:
            return self._builtin(air)
        if air.source is Source.LOCAL:
            return self._local(air)
        raise SourceUnavailable(f"{air.canonical}: downloads from {air.source.value} are not available")

    def _builtin(self, air: AIR) -> ModelRecord:
        spec = builtin.BUILTIN_MODELS.get(air.canonical)
        if spec is None:
            names = ", ".join(sorted(builtin.BUILTIN_MODELS))
            raise ModelNotFound(f"no built-in model {air.canonical} (built-in: {names})")
        folder = self.settings.cache_dir / "builtin" / f"{spec.name}@{spec.version}"
        if not folder.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the destination and rename: a crash leaves a stray temp folder, never a half model.
            staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=folder.parent))
            try:
                builtin.build(spec, staging / "model")
                os.replace(staging / "model", folder)
                log.info("created built-in model %s in %s", air.canonical, folder)
            except OSError:
                if not folder.is_dir():  # another process may have won the rename; theirs is as good
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return self._folder_record(air, folder)

    def _local(self, air: AIR) -> ModelRecord:
        path = Path(air.id)
        if path.is_dir():
            return self._folder_record(air, path)
        raise ModelNotFound(f"{air.id} is not a diffusers model folder")

    def _folder_record(self, air: AIR, folder: Path) -> ModelRecord:
        digest = hashlib.sha256()
        size = 0
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(folder)).encode() + b"\0" + _sha256_file(file).encode())
            size += file.stat().st_size
        return ModelRecord(air, folder, Layout.DIFFUSERS, detect_folder(folder), size, digest.hexdigest())


def require_role(record: ModelRecord, role: str) -> None:
    """Raise WrongArchitecture unless `record` can serve as `role` ("base" or "refiner")."""
    allowed = ROLE_ARCHITECTURES[role]
    if record.architecture not in allowed:
        expected = " or ".join(a.label for a in allowed)
        raise WrongArchitecture(
            f"{record.canonical} is {record.architecture.label}; the {role} must be {expected}",
            expected=expected,
            found=record.architecture.label,
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
