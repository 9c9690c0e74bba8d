"""Where models come from. A remote source turns an AIR into a `RemotePlan`: the files that make up the
model, each with the hash and size it must have and a way to find a URL for its bytes. Fetching, verifying and
caching are the store's business (`_model_download`, `_file_download`, `_cache`), the same for every source.

- `civitai`: checkpoints and LoRAs by model version, one safetensors file chosen explicitly.
- `huggingface`: diffusers-format repositories (the SDXL components only) and single files in a repository
  (a checkpoint or a LoRA).
- `local`: files and folders on this machine, registered by reference.
- built-in tiny models and LoRAs are built on this machine (`modelstore._builtin`, `_builtin_loras`) and need no
  source.

Whether a single file is a checkpoint or a LoRA is read from its header when it is cached, whatever the source
says (`_architecture.identify_file`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelstore._remote import RemoteFile
from modelstore.air import AIR
from modelstore.record import Layout


@dataclass(frozen=True)
class RemotePlan:
    """What to download for one model, and what to remember about it."""

    air: AIR
    layout: Layout
    files: tuple[RemoteFile, ...]
    # The source's description, stored in the index: JSON values only, never tokens or presigned URLs.
    metadata: Mapping[str, Any] = field(default_factory=dict)


class RemoteSource(Protocol):
    name: str

    def plan(self, air: AIR) -> RemotePlan:
        """Ask the source what `air` is. Raises ModelNotFound, WrongArchitecture, UnsafeCheckpoint (refused
        before any byte is downloaded), or the Source* errors."""
        ...
