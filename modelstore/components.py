"""What a model is made of on a device: its components, their content fingerprints and sizes.

The device scheduler uses this to budget memory before loading anything and to hold a component once when two
models share it: the official SDXL refiner ships the base's VAE and OpenCLIP text encoder bit for bit, which is
1.45 GiB of fp16 weights saved per resident pair (shared/research/diffusers.md §2).

Sizes come from safetensors headers at the dtype the model will run in (fp16 on a GPU), never from loading.
Fingerprints hash each component's tensor names (without the layout's prefix), dtypes, shapes and bytes, so the
same weights inside two different files match. Hashing reads the weights once per file; results are memoised
in memory and in `<cache>/components/<sha256>.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

from modelstore._safetensors_header import DTYPE_BYTES, SafetensorsHeader, read_header
from modelstore.local_files import reading
from modelstore.progress import ByteCounter
from modelstore.record import Layout, ModelRecord

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_FLOATS = {"F16", "BF16", "F32", "F64"}

# Original (sgm / civitai) single-file layout: key prefix -> component. The refiner's only text encoder is
# OpenCLIP bigG as embedder 0; the base has CLIP-L as embedder 0 and bigG as embedder 1
# (shared/research/single-file.md, "Exact key layout").
_BASE_PREFIXES = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "conditioner.embedders.0.transformer.": "text_encoder",
    "conditioner.embedders.1.model.": "text_encoder_2",
}
_REFINER_PREFIXES = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "conditioner.embedders.0.model.": "text_encoder_2",
}


@dataclass(frozen=True)
class Component:
    name: str  # unet, vae, text_encoder, text_encoder_2
    fingerprint: str
    file_bytes: int
    half_bytes: int  # floating tensors in fp16/bf16 (how a GPU runs them)
    full_bytes: int  # floating tensors in fp32 (how the CPU runs them)

    def device_bytes(self, half: bool) -> int:
        """Bytes once loaded, floating tensors in half precision or in fp32."""
        return self.half_bytes if half else self.full_bytes


_memo: dict[str, tuple[Component, ...]] = {}
_lock = threading.Lock()


def components_of(
    record: ModelRecord,
    cache_dir: Path | None = None,
    counter: ByteCounter | None = None,
    *,
    keep: bool = True,
    before_measuring: Callable[[], None] | None = None,
) -> tuple[Component, ...]:
    """The weight-bearing components of `record` (memoised by the record's sha256). `counter` hears the bytes
    read when they must be measured; a memoised answer reads nothing and reports nothing. `keep=False` (a
    read-only cache): a memo in `cache_dir` is read, but a new one is kept in memory only. `before_measuring`
    is called before the weights are read, only when they are."""
    with _lock:
        known = _memo.get(record.sha256)
    if known is not None:
        return known
    stored = _load_memo(record, cache_dir)
    if stored is None and before_measuring is not None:
        before_measuring()
    result = stored if stored is not None else _measure(record, counter)
    if stored is None and keep:
        _save_memo(record, cache_dir, result)
    with _lock:
        _memo[record.sha256] = result
    return result


def single_file_prefixes(keys: Iterable[str]) -> dict[str, str]:
    """Key prefix -> component in a single file whose tensors are named `keys`: a refiner's (one text encoder,
    OpenCLIP as embedder 0) or a base's."""
    refiner = not any(k.startswith("conditioner.embedders.1.") for k in keys)
    return dict(_REFINER_PREFIXES if refiner else _BASE_PREFIXES)


def _measure(record: ModelRecord, counter: ByteCounter | None) -> tuple[Component, ...]:
    # A local model is measured through what was checked, as it is loaded: these fingerprints choose modules
    # to share, so they must describe the very files the load will read.
    with reading(record) as path:
        return _measure_at(replace(record, path=path), counter)


def _measure_at(record: ModelRecord, counter: ByteCounter | None) -> tuple[Component, ...]:
    groups: dict[str, list[tuple[Path, SafetensorsHeader, str, str]]] = {}
    if record.layout is Layout.DIFFUSERS:
        for name in COMPONENTS:
            for file in sorted((record.path / name).glob("*.safetensors")):
                header = read_header(file)
                for key in header.tensors:
                    groups.setdefault(name, []).append((file, header, key, key))
    else:
        header = read_header(record.path)
        prefixes = single_file_prefixes(header.tensors)
        for key in header.tensors:
            for prefix, name in prefixes.items():
                if key.startswith(prefix):
                    groups.setdefault(name, []).append((record.path, header, key, key[len(prefix) :]))
                    break
    if counter is not None:
        counter.set_total(sum(h.tensors[k].end - h.tensors[k].start for g in groups.values() for _, h, k, _ in g))
    return tuple(_component(name, groups[name], counter) for name in COMPONENTS if name in groups)


def _component(
    name: str, tensors: list[tuple[Path, SafetensorsHeader, str, str]], counter: ByteCounter | None
) -> Component:
    digest = hashlib.sha256()
    file_bytes = 0
    half = full = 0
    handles: dict[Path, BinaryIO] = {}
    try:
        for path, header, key, stem in sorted(tensors, key=lambda t: t[3]):
            info = header.tensors[key]
            count = 1
            for dim in info.shape:
                count *= dim
            nbytes = info.end - info.start
            file_bytes += nbytes
            floating = info.dtype in _FLOATS
            half += count * (2 if floating else DTYPE_BYTES[info.dtype])
            full += count * (4 if floating else DTYPE_BYTES[info.dtype])
            digest.update(f"{stem}\0{info.dtype}\0{info.shape}\0".encode())
            f = handles.get(path)
            if f is None:
                f = handles[path] = path.open("rb")
            f.seek(header.data_offset + info.start)
            remaining = nbytes
            while remaining:
                chunk = f.read(min(remaining, 8 << 20))
                if not chunk:
                    raise OSError(f"{path} is shorter than its header says")
                digest.update(chunk)
                remaining -= len(chunk)
                if counter is not None:
                    counter.advance(len(chunk))
    finally:
        for f in handles.values():
            f.close()
    return Component(name, digest.hexdigest(), file_bytes, half, full)


def _memo_path(record: ModelRecord, cache_dir: Path | None) -> Path | None:
    return None if cache_dir is None else cache_dir / "components" / f"{record.sha256}.json"


def _load_memo(record: ModelRecord, cache_dir: Path | None) -> tuple[Component, ...] | None:
    path = _memo_path(record, cache_dir)
    if path is None or not path.is_file():
        return None
    try:
        return tuple(Component(**entry) for entry in json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged memo is just recomputed


def _save_memo(record: ModelRecord, cache_dir: Path | None, components: tuple[Component, ...]) -> None:
    path = _memo_path(record, cache_dir)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [asdict(c) for c in components]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)
