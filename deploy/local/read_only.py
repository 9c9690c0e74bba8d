"""A folder as a pod sees a read-only volume: a command run with the folder bind-mounted read-only over itself,
in a mount namespace of its own (inside a user namespace, so no root is needed and nothing outlives the
process). The local fleet starts replicas this way on a shared model cache (issue 20), and the tests use it to
prove that a server with `--cache-read-only` writes nothing: the kernel refuses every write (EROFS).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

_SCRIPT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def read_only_prefix(folder: Path) -> tuple[str, ...]:
    """A command prefix: `[*read_only_prefix(folder), "refinery", ...]` runs with `folder` read-only."""
    return ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _SCRIPT, str(folder))


@functools.cache
def available() -> bool:
    """Whether this machine lets an unprivileged process make a read-only bind mount (unshare, user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = Path("/tmp")
    command = [*read_only_prefix(probe), "sh", "-c", 'touch "$0/.refinery-ro-probe" 2>/dev/null && exit 1 || exit 0']
    try:
        result = subprocess.run([*command, str(probe)], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0
