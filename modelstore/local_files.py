"""Opening a local model's files so that what is read is what was checked (issue 21, items 5, 6 and 8).

A path is resolved once (`os.path.realpath`); from then on nothing is resolved by name again: the real path
is opened one component at a time below its root's descriptor with `O_NOFOLLOW`, so a name swapped for a
link between the resolution and the opening is refused, not followed. Inside a diffusers folder every file
the loader reads is resolved and opened the same way, and (under confinement) must lead into one of the
roots. What was opened is kept open: `Opened.view` is a private folder of links to `/proc/self/fd/N`, so
whatever reads through it (hashing, header checks, diffusers) reads exactly the inodes that were checked.
Loading and measuring a model come later, from a record: `reading` opens it again, under the roots it was
checked with, and reads it only if each file is still the one hashed (the record carries their identities).

Identity is the opened file's (st_dev, st_ino, size, mtime): a model is registered under its real path, once,
whatever spelling named it (`/proc/self/root/...`, `/proc/self/cwd/...`, `//`, `/./`).

Every failure, whatever its cause (a link out of the roots, a swap, EACCES on `/proc/1/root`, a FIFO, a
device), is `LocalPathRefused`, which says nothing about what is at the path.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelstore.air import Source
from modelstore.errors import ModelNotFound, ModelStoreError
from modelstore.record import FileId, LocalFiles, ModelRecord

# What the loader reads from a diffusers folder; pickles, ONNX/Flax exports and hidden folders are never read.
LOADED_SUFFIXES = (".json", ".txt", ".model", ".safetensors")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO named by a request must not block its opener; it is refused by its type right after.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class LocalPathRefused(ModelNotFound):
    """A local path that cannot be opened safely: outside the roots, through a link that changed, unreadable,
    or neither a regular file nor a folder. The message never describes what is there."""


@dataclass
class Opened:
    """A local model opened once: its real path, and each file the loader reads ("" for a single file) with
    its descriptor and identity. Close it (or use `open_model` as a context manager) to release them."""

    path: Path
    is_file: bool
    fds: dict[str, int] = field(default_factory=dict)
    ids: dict[str, FileId] = field(default_factory=dict)

    def fd_path(self, relative: str) -> Path:
        """A name that opens exactly the checked file, whatever happens to its own name meanwhile."""
        return Path(f"/proc/self/fd/{self.fds[relative]}")

    @contextmanager
    def view(self) -> Iterator[Path]:
        """A private folder laid out like the model (a single file is `model.safetensors`: diffusers picks its
        reader by name) whose entries lead to the opened descriptors. A store error raised while it is in use
        names the model's own path, not the view's."""
        top = Path(tempfile.mkdtemp(prefix="refinery-local-"))
        try:
            for relative in self.fds:
                link = top / (relative or "model.safetensors")
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.fd_path(relative))
            view = top / "model.safetensors" if self.is_file else top
            try:
                yield view
            except ModelStoreError as exc:
                if str(view) not in exc.message:
                    raise
                raise _reworded(exc, exc.message.replace(str(view), str(self.path))) from exc
        finally:
            shutil.rmtree(top, ignore_errors=True)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def real_path(path: str | Path) -> Path:
    """`path` resolved once; LocalPathRefused if it cannot be (an unreadable link such as /proc/1/root)."""
    try:
        return Path(os.path.realpath(path, strict=False))
    except (OSError, ValueError):
        raise LocalPathRefused("the local path cannot be opened") from None


def root_of(real: Path, roots: Sequence[Path]) -> Path | None:
    """The root (resolved) that holds the resolved `real`, if any."""
    for root in roots:
        base = real_path(root)
        if real == base or base in real.parents:
            return base
    return None


@contextmanager
def open_model(path: str | Path, roots: Sequence[Path], *, confined: bool) -> Iterator[Opened]:
    """Resolve `path` once and open the model there (a .safetensors file, or every file a diffusers folder's
    loader reads). `confined`: the model must lie under one of `roots`. Either way, a model that lies under a
    root may read nothing outside the roots (a link in its folder that leads out is refused). Raises
    LocalPathRefused."""
    real = real_path(path)
    root = root_of(real, roots)
    if root is None and root_of(Path(os.path.normpath(path)), roots) is not None:
        # Named under a root but resolving out of it now (a name swapped for a link since it was checked).
        raise LocalPathRefused("the local path is outside the allowed roots")
    if confined and root is None:
        raise LocalPathRefused("the local path is outside the allowed roots")
    opened = Opened(real, is_file=False)
    try:
        top = _open_real(real, root)
        st = os.fstat(top)
        if stat.S_ISREG(st.st_mode):
            opened.is_file = True
            opened.fds[""], opened.ids[""] = top, FileId.of(st)
        elif stat.S_ISDIR(st.st_mode):
            try:
                _open_folder(opened, top, roots if root is not None else ())
            finally:
                os.close(top)
        else:
            os.close(top)
            raise LocalPathRefused("the local path is neither a file nor a folder")
        yield opened
    finally:
        opened.close()


def identities(path: str | Path, roots: Sequence[Path]) -> dict[str, FileId]:
    """What `open_model(path, roots, confined=False)` would open, by identity (nothing is read)."""
    with open_model(path, roots, confined=False) as opened:
        return dict(opened.ids)


@contextmanager
def reading(record: ModelRecord) -> Iterator[Path]:
    """Where to read `record`'s files: its own path for a model in the cache; for a local model, a view of
    its files opened again now (below the roots it was checked under, as `open_model`) and kept open while
    the block reads, refused (LocalPathRefused) unless each is the very file that was checked and hashed.
    What loads or measures a local model reads that, never its names: a name swapped after the check cannot
    lead the reader elsewhere."""
    if record.air.source is not Source.LOCAL:
        yield record.path
        return
    checked = record.local or LocalFiles(())
    with open_model(record.path, checked.roots, confined=False) as opened:
        if checked.ids and opened.ids != dict(checked.ids):
            raise LocalPathRefused("the local model changed since it was checked; ask for it again")
        with opened.view() as view:
            yield view


def checked(record: ModelRecord, fingerprint: Mapping[str, Sequence[Any]], roots: Sequence[Path]) -> ModelRecord:
    """`record` carrying what its files were when hashed (a local source's fingerprint: relative path ->
    [size, mtime_ns, sha256, device, inode]) and the roots it was confined to, for `reading`."""
    ids = tuple((p, FileId(int(v[3]), int(v[4]), int(v[0]), int(v[1]))) for p, v in fingerprint.items())
    return replace(record, local=LocalFiles(ids, tuple(roots)))


def folders_read(path: str | Path) -> tuple[Path, ...]:
    """The folders that the files of the model at `path` really lie in, links followed (e.g. a Hugging Face
    cache snapshot's `blobs/`); () if it cannot be opened. For a caller vouching for the links its own model
    makes (`refinery generate`'s command line), never for a path a request named."""
    try:
        with open_model(path, (), confined=False) as opened:
            return tuple(dict.fromkeys(Path(os.readlink(opened.fd_path(r))).parent for r in opened.fds))
    except (LocalPathRefused, OSError):
        return ()


def _reworded(exc: ModelStoreError, message: str) -> ModelStoreError:
    """`exc` as a new error of its kind saying `message` (errors are values: the raised one stays as it is)."""
    clone = type(exc).__new__(type(exc))
    clone.__dict__.update(exc.__dict__, _message=message)
    clone.args = (message,)
    return clone


def _open_folder(opened: Opened, folder_fd: int, roots: Sequence[Path]) -> None:
    names = os.listdir(folder_fd)
    if "model_index.json" not in names:
        raise LocalPathRefused("the local folder is not a diffusers folder (no model_index.json)")
    wanted = ["model_index.json"]
    for component in sorted(n for n in names if not n.startswith(".")):
        inner = opened.path / component
        if not inner.is_dir():
            continue
        try:
            files = sorted(os.listdir(inner))
        except OSError:
            raise LocalPathRefused("a folder of the local model cannot be read") from None
        wanted += [f"{component}/{n}" for n in files if n.endswith(LOADED_SUFFIXES) and not n.startswith(".")]
    for relative in wanted:
        fd = _open_inside(opened.path / relative, roots)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if relative == "model_index.json":
                raise LocalPathRefused("the local folder's model_index.json is not a file")
            continue  # e.g. a folder named like a config: not something the loader reads as a file
        opened.fds[relative], opened.ids[relative] = fd, FileId.of(st)


def _open_inside(path: Path, roots: Sequence[Path]) -> int:
    """Resolve a file of a folder once (it may be a link, e.g. into a Hugging Face cache's blobs) and open
    its resolution; under confinement it must lead into a root."""
    real = real_path(path)
    root = root_of(real, roots)
    if roots and root is None:
        raise LocalPathRefused("a file of the local model leads outside the allowed roots")
    return _open_real(real, root)


def _open_real(real: Path, root: Path | None) -> int:
    """Open the resolved `real` one component at a time below `root` (or "/") without following any link."""
    base = root if root is not None else Path("/")
    parts = real.relative_to(base).parts
    try:
        fd = os.open(base, _DIR if parts else _FILE)
    except OSError:
        raise LocalPathRefused("the local path cannot be opened") from None
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        try:
            child = os.open(part, _FILE if last else _DIR, dir_fd=fd)
        except OSError:
            # ELOOP/ENOTDIR: a name became a link after it was resolved; EACCES, ENOENT: gone or unreadable.
            raise LocalPathRefused("the local path cannot be opened") from None
        finally:
            os.close(fd)
        fd = child
    return fd
