"""Cold start: while a fresh process imports torch and diffusers (seconds), the kernel can already be reading
the pinned pairs' weights from disk, so that loading them finds them in the page cache.

On a node that never read the weights (autoscaling), a pinned SDXL pair is about 11 GB from disk: seconds at
NVMe speed, which otherwise follow the imports instead of overlapping them. This only asks the kernel to read
ahead (`posix_fadvise(WILLNEED)`) the files of pinned models that are already in the cache; it never registers,
downloads or hashes anything (the server's own resolution does that, once).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from modelstore import ModelStore
from server.core.settings import Settings

log = logging.getLogger(__name__)


def start_prefetch(settings: Settings) -> threading.Thread:
    """Read ahead the cached pinned models' weight files on a daemon thread; returns it (it ends by itself)."""
    thread = threading.Thread(target=prefetch_pinned, args=(settings,), name="refinery-prefetch", daemon=True)
    thread.start()
    return thread


def prefetch_pinned(settings: Settings) -> list[Path]:
    """The files it asked the kernel to read ahead. Anything that goes wrong only costs the head start."""
    files: list[Path] = []
    try:
        store = ModelStore(settings.store)
        try:
            for pair in settings.pins:
                for _, air in pair.roles():
                    # None unless cached; nothing is registered, and no blob is read in full (check=False)
                    record = store.lookup(air, check=False)
                    if record is not None:
                        files += [record.path] if record.path.is_file() else sorted(record.path.rglob("*.safetensors"))
        finally:
            store.close()
        for path in files:
            with path.open("rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
    except Exception as exc:  # e.g. an unreadable cache: the server's own start reports what matters
        log.debug("prefetching the pinned models failed", exc_info=exc)
    return files
