"""Reading a safetensors file once (issue 19): one mapping of the file, hashed through when the file still owes
its check, and its tensors made as views of that same mapping.

Before, a cached model was read twice at start: whole for its fast digest (`_integrity`), then again by
safetensors, which maps the file itself. Here the file is mapped once (private: a module that writes to its
weights, as fusing a LoRA does, gets its own copy of the page it writes); the XXH3 runs over every byte of
the mapping in order, which is the one read from storage, and only then are the tensors made, as views of the
pages that read brought in: no second pass, and no host copy at all where a tensor keeps its dtype (on a GPU
the move to the device copies from these pages directly). Bytes that no tensor wants (a component another
model already holds) are hashed all the same: the digest covers every byte of the file, exactly as the check
it replaces did.

An earlier version read each chunk into the tensors' own fresh memory with `readinto`: as many bytes from
storage, but every page of the model allocated, zeroed and copied into once more, which cost a 1 GB model
about a second more than the mapping on the CPU (`benchmarks/bench_cold_start.py`).

A tensor is cast to the dtype it will run in as soon as it is made (fp16 files become fp32 on the CPU), so
the file's dtype and the running one are never both held for a whole model. A tensor whose offset is not a
multiple of its element size is copied out (a view must be aligned). Little-endian, as safetensors is and
every machine this runs on.

The header is checked as `_safetensors_header` checks any (a pickle is refused by its bytes), and the tensors
must cover the data exactly, in order: safetensors refuses gaps and overlaps too.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelstore._digests import fast_hash
from modelstore._safetensors_header import MAX_HEADER_BYTES, SafetensorsHeader, TensorInfo, parse_header
from modelstore.errors import CorruptModel

if TYPE_CHECKING:
    import torch

# Big enough that a hash call is nothing per byte, small enough that other threads get the GIL often.
_CHUNK = 4 << 20

_TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}


@dataclass(frozen=True)
class FileRead:
    """What one read of a file gave: the tensors asked for, and the fast digest of all its bytes (if asked)."""

    tensors: dict[str, torch.Tensor]
    bytes_read: int
    digest: str | None


class TensorFile:
    """An open safetensors file, read at most once (`read`); `stat` is what was opened, for the check."""

    def __init__(self, f: io.FileIO, name: str) -> None:
        self._f = f
        self.name = name
        self.stat = os.fstat(f.fileno())

    def read(self, *, keep: Callable[[str], bool], dtype: Any, hashed: bool) -> FileRead:
        """Every byte of the file in one pass: the tensors whose key `keep` accepts, floating ones cast to
        `dtype` (None: as stored); the XXH3-128 of the whole file with `hashed`. CorruptModel or
        UnsafeCheckpoint for a file that is not what its header says."""
        size = self.stat.st_size
        if size < 8:  # nothing to map; parse_header names what is wrong
            parse_header(io.BytesIO(self._f.read()), size, name=self.name)
        mapping = mmap.mmap(self._f.fileno(), size, access=mmap.ACCESS_COPY)
        with contextlib.suppress(OSError, AttributeError):
            mapping.madvise(mmap.MADV_SEQUENTIAL)  # the hash walks it in order: read ahead
        view = memoryview(mapping)
        try:
            header = _header(view, size, self.name)
            ordered = _in_file_order(header, size, self.name)
            digest = _hexdigest(view) if hashed else None
            tensors = {
                key: _cast(_tensor(mapping, header.data_offset, info), dtype) for key, info in ordered if keep(key)
            }
        finally:
            view.release()  # the tensors keep the mapping alive; this view must not
        return FileRead(tensors, size, digest)


@contextmanager
def open_tensor_file(path: Path, name: str) -> Iterator[TensorFile]:
    """`path` opened for one read (`name` labels it in messages)."""
    with path.open("rb", buffering=0) as f:
        yield TensorFile(f, name)


def _header(view: memoryview, file_size: int, name: str) -> SafetensorsHeader:
    length = struct.unpack("<Q", view[:8])[0]
    end = 8 + length if 2 <= length <= MAX_HEADER_BYTES and 8 + length <= file_size else 8
    # parse_header refuses what is not safetensors (a pickle, an implausible length) from these bytes alone.
    return parse_header(io.BytesIO(view[:end].tobytes()), file_size, name=name)


def _hexdigest(view: memoryview) -> str:
    """XXH3-128 of the whole mapping, a chunk at a time (the GIL is let go between chunks)."""
    digest = fast_hash()
    for offset in range(0, len(view), _CHUNK):
        digest.update(view[offset : offset + _CHUNK])
    return digest.hexdigest()


def _tensor(mapping: mmap.mmap, data_offset: int, info: TensorInfo) -> torch.Tensor:
    import torch

    dtype = getattr(torch, _TORCH_DTYPES[info.dtype])
    count = math.prod(info.shape)
    if count == 0:
        return torch.empty(info.shape, dtype=dtype)
    offset = data_offset + info.start
    if offset % dtype.itemsize:  # a view must be aligned to its element: copy this one out
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=info.end - info.start, offset=offset)
        return raw.clone().view(dtype).reshape(info.shape)
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(info.shape)


def _in_file_order(header: SafetensorsHeader, file_size: int, name: str) -> list[tuple[str, TensorInfo]]:
    """The tensors by offset, which must tile the data region exactly (as safetensors itself requires)."""
    ordered = sorted(header.tensors.items(), key=lambda item: (item[1].start, item[1].end))
    end = 0
    for key, info in ordered:
        if info.start != end:
            raise CorruptModel(f"{name}: tensor {key!r} does not start where the previous one ends")
        end = info.end
    if header.data_offset + end > file_size:
        raise CorruptModel(f"{name} ended before the bytes its header promises")
    if header.data_offset + end < file_size:
        raise CorruptModel(f"{name} holds bytes after its last tensor")
    return ordered


def _cast(tensor: torch.Tensor, dtype: Any) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)
