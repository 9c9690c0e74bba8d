"""The weight-file reads of one load: each file read once (`_tensor_file`), and the check it still owes
settled from that very read (`record.WeightChecks`: issue 19).

A file whose check is owed is hashed as it is read; its verdict comes as soon as its last byte is in, before
any module is built from its tensors. A failed verdict raises `WeightsDamaged`, which never leaves
`modelstore.loading`: the tensors read so far are dropped with the load, and the loader asks the store to
fetch the model again (or to refuse it, as a failed check at resolve does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelstore._tensor_file import open_tensor_file
from modelstore.record import WeightChecks

if TYPE_CHECKING:
    import torch


class WeightsDamaged(Exception):
    """A weight file of the model being loaded failed its check (it was set aside). Internal to loading."""

    def __init__(self, damage: str) -> None:
        super().__init__(damage)
        self.damage = damage


class LoadReads:
    """Reads the weight files of the model in `root` for one load, in the dtype it will run in, settling the
    checks `checks` says they owe. `bytes_read` and `hashed` count what was read and what was checked."""

    def __init__(self, root: Path, checks: WeightChecks | None, dtype: Any) -> None:
        self._root = root
        self._checks = checks
        self._dtype = dtype
        self.bytes_read = 0
        self.hashed = 0
        self.files: list[str] = []

    def __call__(self, path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        relative = path.relative_to(self._root).as_posix()
        with open_tensor_file(path, relative) as file:
            owed = self._checks is not None and self._checks.owed(relative, file.stat)
            read = file.read(keep=keep, dtype=self._dtype, hashed=owed)
        self.bytes_read += read.bytes_read
        self.files.append(relative)
        if self._checks is not None and owed and read.digest is not None:
            self.hashed += read.bytes_read
            damage = self._checks.settle(relative, file.stat, read.digest)
            if damage is not None:
                raise WeightsDamaged(damage)
        return read.tensors

    def settle_rest(self) -> None:
        """Check the owed files this load did not read (WeightsDamaged if one fails)."""
        damage = None if self._checks is None else self._checks.settle_rest()
        if damage is not None:
            raise WeightsDamaged(damage)
