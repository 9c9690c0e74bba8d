"""Read and sanity-check a safetensors header without trusting the file.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then raw tensor bytes. The
file is recognised by that structure, never by its extension: a pickle (``\\x80\\x02``..``\\x80\\x05``) or a
torch zip (``PK\\x03\\x04``) is refused with a clear error and never deserialised
(shared/research/modelstore.md §4.1). Nothing here imports torch or executes anything from the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from modelstore.errors import UnsafeCheckpoint

# Real SDXL headers are ~250 KB (2.5k tensors); 100 MB leaves room and stops a hostile length at once.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets relative to the end of the header
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # where tensor bytes begin in the file


def describe_magic(prefix: bytes) -> str | None:
    """Name a known non-safetensors format from the first bytes of a file, or None."""
    if prefix.startswith(b"PK\x03\x04"):
        return "a PyTorch zip (pickle) checkpoint"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return "a Python pickle"
    if prefix.lstrip().startswith((b"{", b"<")):
        return "a JSON or HTML document (an error page?)"
    if prefix.startswith(b"GGUF"):
        return "a GGUF file"
    return None


def read_header(path: Path) -> SafetensorsHeader:
    with path.open("rb") as f:
        return parse_header(f, path.stat().st_size, name=path.name)


def parse_header(f: BinaryIO, file_size: int, *, name: str = "checkpoint") -> SafetensorsHeader:
    """Parse and validate the header of an open safetensors file of `file_size` bytes."""
    prefix = f.read(8)
    known = describe_magic(prefix)
    if known is not None:
        raise UnsafeCheckpoint(f"{name} is {known}, not safetensors; only safetensors are loaded")
    if len(prefix) < 8:
        raise UnsafeCheckpoint(f"{name} is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length < 2 or length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise UnsafeCheckpoint(f"{name} is not a safetensors file (header length {length} is implausible)")
    raw = f.read(length)
    if len(raw) != length or not raw.lstrip().startswith(b"{"):
        raise UnsafeCheckpoint(f"{name} is not a safetensors file (no JSON header)")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeCheckpoint(f"{name} has a corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(document, dict):
        raise UnsafeCheckpoint(f"{name} has a corrupt safetensors header (not an object)")
    data_offset = 8 + length
    data_size = file_size - data_offset
    metadata_raw = document.pop("__metadata__", {}) or {}
    if not isinstance(metadata_raw, dict) or not all(isinstance(v, str) for v in metadata_raw.values()):
        raise UnsafeCheckpoint(f"{name} has malformed safetensors metadata")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in document.items():
        tensors[key] = _tensor(name, key, entry, data_size)
    return SafetensorsHeader(tensors, dict(metadata_raw), data_offset)


def _tensor(name: str, key: str, entry: object, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise UnsafeCheckpoint(f"{name}: tensor {key!r} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise UnsafeCheckpoint(f"{name}: tensor {key!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise UnsafeCheckpoint(f"{name}: tensor {key!r} has a malformed shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise UnsafeCheckpoint(f"{name}: tensor {key!r} points outside the file")
    count = 1
    for dim in shape:
        count *= dim
    if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise UnsafeCheckpoint(f"{name}: tensor {key!r} size does not match its shape and dtype")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
