"""Reading a safetensors file once (issue 19): its bytes land in the storage of the tensors they are, and are
hashed on the way when the file still owes its check.

Before, a cached model was read twice at start: whole for its fast digest (`_integrity`), then again by
safetensors, which maps the file and copies every tensor out of the mapping. Here one sequential `readinto`
per chunk fills each tensor's own memory straight from the file (no mapping, no staging buffer, no second
copy), and the same chunk, still in the CPU's cache, goes through XXH3 when asked. Bytes that no tensor wanted
(a component another model already holds) are read into a scratch buffer and hashed all the same: the digest
covers every byte of the file, exactly as the check it replaces did.

A tensor is cast to the dtype it will run in as soon as it is read (fp16 files become fp32 on the CPU), so the
file's dtype and the running one are never both held for a whole model. Little-endian, as safetensors is and
every machine this runs on.

The header is checked as `_safetensors_header` checks any (a pickle is refused by its bytes), and the tensors
must cover the data exactly, in order: safetensors refuses gaps and overlaps too, and a file read in one pass
cannot honour them anyway.
"""

from __future__ import annotations

import io
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
    import xxhash

# Big enough that a syscall and a hash call are nothing per byte, small enough to stay in the CPU's cache
# between the read and the hash.
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
        stream = _Stream(self._f, fast_hash() if hashed else None, self.name)
        header = stream.header(self.stat.st_size)
        tensors = {}
        for key, info in _in_file_order(header, self.stat.st_size, self.name):
            if keep(key):
                tensors[key] = _cast(stream.tensor(info), dtype)
            else:
                stream.skip(info.end - info.start)
        return FileRead(tensors, stream.count, stream.hexdigest())


@contextmanager
def open_tensor_file(path: Path, name: str) -> Iterator[TensorFile]:
    """`path` opened for one sequential read (`name` labels it in messages)."""
    with path.open("rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield TensorFile(f, name)


class _Stream:
    """The file's bytes in order, each chunk hashed (when there is a hash) as soon as it is in memory."""

    def __init__(self, f: io.FileIO, digest: xxhash.xxh3_128 | None, name: str) -> None:
        self._f = f
        self._hash = digest
        self._name = name
        self._scratch: memoryview | None = None
        self.count = 0

    def header(self, file_size: int) -> SafetensorsHeader:
        prefix = self._bytes(min(8, file_size))
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if 2 <= length <= MAX_HEADER_BYTES and 8 + length <= file_size:
            prefix += self._bytes(length)
        # parse_header refuses what is not safetensors (a pickle, an implausible length) from these bytes alone.
        return parse_header(io.BytesIO(prefix), file_size, name=self._name)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        import torch

        tensor = torch.empty(info.shape, dtype=getattr(torch, _TORCH_DTYPES[info.dtype]))
        if info.end > info.start:
            self._fill(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        return tensor

    def skip(self, size: int) -> None:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_CHUNK))
        while size:
            size -= self._fill(self._scratch[: min(size, _CHUNK)])

    def hexdigest(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()

    def _bytes(self, size: int) -> bytes:
        buffer = bytearray(size)
        self._fill(memoryview(buffer))
        return bytes(buffer)

    def _fill(self, target: memoryview) -> int:
        """Fill `target` from the file, hashing each chunk; CorruptModel if the file ends first."""
        done = 0
        while done < len(target):
            chunk = target[done : done + _CHUNK]
            got = 0
            while got < len(chunk):
                n = self._f.readinto(chunk[got:])
                if not n:
                    raise CorruptModel(f"{self._name} ended before the bytes its header promises")
                got += n
            if self._hash is not None:
                self._hash.update(chunk)
            done += got
        self.count += done
        return done


def _in_file_order(header: SafetensorsHeader, file_size: int, name: str) -> list[tuple[str, TensorInfo]]:
    """The tensors by offset, which must tile the data region exactly (as safetensors itself requires)."""
    ordered = sorted(header.tensors.items(), key=lambda item: (item[1].start, item[1].end))
    end = 0
    for key, info in ordered:
        if info.start != end:
            raise CorruptModel(f"{name}: tensor {key!r} does not start where the previous one ends")
        end = info.end
    if header.data_offset + end != file_size:
        raise CorruptModel(f"{name} holds bytes after its last tensor")
    return ordered


def _cast(tensor: torch.Tensor, dtype: Any) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)
