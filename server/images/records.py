"""Each stored image's record: a small JSON file beside it (`<digest>.json`), written atomically like the image.

Why one file per image rather than one SQLite index: a record is committed by the same temp + fsync + rename as
its image, so the two cannot disagree after a crash in any way worse than "an image with no record" (removed at
start); there is no database to lock on a volume that several replicas may share (SQLite's locks are not to be
trusted on network file systems), nothing to migrate, and one damaged record costs one image, not the index.
The store keeps every record in memory too (a few hundred bytes each; the quota bounds how many there are), so
looking an image up reads nothing from disk; the files are read once, at start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from server.images import files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One stored image: what its header said, its file's size, and until when it is kept (unix seconds)."""

    digest: str
    mime_type: str
    width: int
    height: int
    size_bytes: int
    expires_at: float

    def write(self, directory: Path) -> None:
        data = json.dumps(asdict(self), sort_keys=True).encode()
        files.write_atomically(files.record_path(directory, self.digest), data)


def read_all(directory: Path) -> Iterator[Record]:
    """Every readable record in `directory`; one that is not (a damaged file) is logged and skipped, and its
    image is then an orphan that the store removes."""
    for path in sorted(directory.glob(f"*{files.RECORD_SUFFIX}")):
        digest = path.name.removesuffix(files.RECORD_SUFFIX)
        if not files.is_digest(digest):
            continue
        try:
            fields = json.loads(path.read_bytes())
            record = Record(
                digest=digest,
                mime_type=str(fields["mime_type"]),
                width=int(fields["width"]),
                height=int(fields["height"]),
                size_bytes=int(fields["size_bytes"]),
                expires_at=float(fields["expires_at"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("image store: skipping the unreadable record %s (%s)", path.name, exc)
            files.remove(path)
            continue
        yield record
