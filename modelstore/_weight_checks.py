"""Checks a cached model's weight files owe, left to the read that loads them (issue 19: one read at start).

A store built with `check_weights_when_loaded` (the server's) resolves a cached checkpoint without reading
its weight files: the small files (configs, tokenizers) are checked at once as before, and the record carries
`OwedChecks` for its `.safetensors` files. `load_pipeline` reads each of them once, hashing the bytes it builds
tensors from, and settles each check here with the digest of that read; files it does not read (a component
another model already holds, a variant) are read for their check alone before it returns. The verdict is the
same as before, from the same recorded XXH3-128 (`_integrity`): a file that fails is quarantined and logged,
the load's tensors are dropped before anything sees them, and the model is fetched again where its source
allows (`repaired`) or refused with IntegrityError, as `resolve` does when its check fails.

Only blobs with a recorded fast digest are left to the load; one from before fast digests were kept has its
SHA256 checked at resolve, as before. Local models are not hashed at start at all (`_sources/local.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace

from modelstore._blobs import identity_of
from modelstore._cache import Cache
from modelstore._index import IndexEntry
from modelstore._integrity import BlobChecks, describe
from modelstore.air import Source
from modelstore.record import ModelRecord


class OwedChecks:
    """`WeightChecks` for one resolved record: its weight files (path in the model folder -> blob) whose
    check is owed, and how to fetch the model again."""

    def __init__(
        self,
        checks: BlobChecks,
        entry: IndexEntry,
        owed: Mapping[str, str],
        repair: Callable[[str], ModelRecord],
    ) -> None:
        self._checks = checks
        self._entry = entry
        self._owed = dict(owed)
        self._repair = repair

    def owed(self, relative: str, opened: os.stat_result) -> bool:
        sha = self._owed.get(relative)
        return sha is not None and not self._checks.is_checked(sha, identity_of(opened))

    def settle(self, relative: str, opened: os.stat_result, digest: str) -> str | None:
        damage = self._checks.settle_read(self._entry, self._owed[relative], identity_of(opened), digest)
        return None if damage is None else damage.describe()

    def settle_rest(self) -> str | None:
        damages = self._checks.check_owed(self._entry, set(self._owed.values()))
        return describe(damages) if damages else None

    def repaired(self, damage: str) -> ModelRecord:
        return self._repair(damage)


def owed_checks(
    record: ModelRecord, cache: Cache, checks: BlobChecks, repair: Callable[[str], ModelRecord]
) -> ModelRecord:
    """`record` carrying the checks its weight files still owe (`BlobChecks.deferrable`), if any."""
    entry = cache.index.get(record.canonical)
    if entry is None or entry.source == Source.LOCAL.value:
        return record
    owed = checks.deferrable(entry)
    return replace(record, weight_checks=OwedChecks(checks, entry, owed, repair)) if owed else record


def settle_first(record: ModelRecord) -> None:
    """Make the checks `record` owes before something other than its load reads its weights (measuring its
    components), fetching it again where one fails, as its load would."""
    checks = record.weight_checks
    if checks is None:
        return
    damage = checks.settle_rest()
    if damage is not None:
        checks.repaired(damage)  # the same files, fetched again and checked: `record` still names them
