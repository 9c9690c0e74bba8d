"""Model folders: what the loader opens, built from blobs.

A cached model is a folder of relative symlinks into the blob store, laid out exactly as the loader expects:

    <cache>/models/<name>/<digest>/model.safetensors                  a single-file checkpoint
    <cache>/models/<name>/<digest>/unet/diffusion_pytorch_model.safetensors -> ../../../../blobs/sha256/ab/ab…
                                  /model_index.json, scheduler/, tokenizer/, ...   a diffusers folder

`<name>` is the canonical AIR made safe for a file name, `<digest>` the content digest of the folder's files,
so a folder never changes once built: it is assembled in `<cache>/tmp/` and renamed into place in one step,
and if it already exists it is identical by construction. Symlinks, not copies, so each byte is stored once
however many models share it (the built-in refiner shares its VAE and text encoder with the base); the
Hugging Face cache uses the same layout, and diffusers and transformers load from it unchanged.

File names inside are chosen by the store, never by a server (a civitai file name or a Content-Disposition is
metadata only), and are checked to stay inside the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from modelstore._blobs import BlobStore
from modelstore._staging import staging_folder

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+\-]")


def folder_name(canonical: str) -> str:
    """A file-name-safe, collision-free name for a canonical AIR (`civitai:1@2` -> `civitai_1@2-3f2a9c1b`)."""
    readable = _UNSAFE.sub("_", canonical)[:80].lstrip(".")
    return f"{readable}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def content_digest(files: Mapping[str, str]) -> str:
    """The digest of a folder: sha256 over its sorted `path NUL file-sha256` entries."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + files[path].encode())
    return digest.hexdigest()


def check_relative(path: str) -> None:
    """Refuse a path that could leave the model folder (absolute, `..`, backslashes, empty parts)."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(p in ("", ".", "..") for p in parts)
        or path.endswith("/")
    ):
        raise ValueError(f"unsafe path inside a model folder: {path!r}")


class Snapshots:
    def __init__(self, root: Path, blobs: BlobStore, *, read_only: bool = False) -> None:
        self.root = root
        self._models = root / "models"
        self._tmp = root / "tmp"
        self._blobs = blobs
        if not read_only:
            self._models.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)

    def build(self, canonical: str, files: Mapping[str, str]) -> Path:
        """The folder for `canonical` holding `files` (path inside -> blob sha256), built if missing."""
        for path in files:
            check_relative(path)
        target = self._models / folder_name(canonical) / content_digest(files)[:16]
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with staging_folder(self._tmp, "snapshot-") as staging:
            folder = staging / "folder"
            folder.mkdir()
            folder.chmod(0o755)  # whatever the umask: a shared cache is read by other accounts too
            for path, sha256 in files.items():
                link = folder / path
                link.parent.mkdir(parents=True, exist_ok=True)
                # Relative, so the cache folder can be moved or mounted elsewhere as a whole.
                relative = os.path.relpath(self._blobs.path(sha256), target / PurePosixPath(path).parent)
                link.symlink_to(relative)
            try:
                os.rename(folder, target)
            except OSError:
                if not target.is_dir():
                    raise
                # Another thread or process built the same folder first; its content is the same by name.
        return target

    def remove(self, folder: Path) -> None:
        """Delete a model folder (symlinks only; the blobs are the cache's to collect)."""
        if self._models not in folder.parents:
            raise ValueError(f"{folder} is not a model folder of this cache")
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # the per-model parent, when it held only this folder

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def absolute(self, stored: str) -> Path:
        return self.root / stored
