"""The safetensors headers of a diffusers folder's components, checked by content before anything loads them.

diffusers picks a loader by file name (shared/research/modelstore.md §3.8), so every weight file a
`from_pretrained` call would read is opened here first: each must be a well-formed safetensors file
(`_safetensors_header` refuses pickles by their bytes), and a component that only has pickled
weights is refused by name. Sharded weights are followed through their `*.safetensors.index.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelstore._safetensors_header import TensorInfo, read_header
from modelstore.errors import CorruptModel, UnsafeCheckpoint

# diffusers models, then transformers models.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def component_tensors(folder: Path, component: str) -> dict[str, TensorInfo]:
    """Every tensor of `folder/component`, from its safetensors header(s); no tensor data is read."""
    directory = folder / component
    for stem in _WEIGHT_STEMS:
        single = directory / f"{stem}.safetensors"
        if single.is_file():
            return dict(read_header(single).tensors)
        index = directory / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _sharded(index)
    raise _no_weights(directory)


def component_files(folder: Path, component: str) -> list[Path]:
    """The safetensors file(s) that hold `folder/component`'s weights: the ones `component_tensors` reads the
    headers of, each once."""
    directory = folder / component
    for stem in _WEIGHT_STEMS:
        single = directory / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = directory / f"{stem}.safetensors.index.json"
        if index.is_file():
            return [index.parent / shard for shard in sorted(set(_weight_map(index).values()))]
    raise _no_weights(directory)


def _no_weights(directory: Path) -> Exception:
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    pickles = [name for name in present if name.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        return UnsafeCheckpoint(
            f"{directory} has only pickled weights ({', '.join(pickles)}); only safetensors are loaded"
        )
    others = [name for name in present if name.endswith(".safetensors")]
    found = f" (found {', '.join(others)}; variants are not loaded)" if others else ""
    return CorruptModel(f"{directory} has no weights{found}")


def _weight_map(index: Path) -> dict[str, str]:
    """A shard index's tensor -> shard file, each shard a file beside the index (never a path elsewhere)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptModel(f"{index} is not a valid shard index ({exc.__class__.__name__})") from None
    if not isinstance(weight_map, dict):
        raise CorruptModel(f"{index} is not a valid shard index (weight_map is not an object)")
    for shard in weight_map.values():
        # The index is data from the download: a shard name is a file beside it, never a path elsewhere.
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise UnsafeCheckpoint(f"{index} names an invalid shard {shard!r}")
        if not (index.parent / shard).is_file():
            raise CorruptModel(f"{index} names a missing shard {shard}")
    return weight_map


def _sharded(index: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    headers: dict[str, dict[str, TensorInfo]] = {}
    for key, shard in _weight_map(index).items():
        if shard not in headers:
            headers[shard] = dict(read_header(index.parent / shard).tensors)
        info = headers[shard].get(key)
        if info is None:
            raise CorruptModel(f"{index} places {key} in {shard}, which does not hold it")
        tensors[key] = info
    return tensors
