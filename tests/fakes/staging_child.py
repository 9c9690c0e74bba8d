"""Hold a staging folder in a process of its own (for kill -9 and two-process tests):

    python -m tests.fakes.staging_child TMP_DIR

Prints the folder's path once it holds it (with a file inside), then waits for a line on stdin and ends
normally."""

from __future__ import annotations

import sys
from pathlib import Path

from modelstore._staging import staging_folder


def main() -> None:
    tmp = Path(sys.argv[1])
    tmp.mkdir(parents=True, exist_ok=True)
    with staging_folder(tmp, "builtin-") as folder:
        (folder / "model").mkdir()
        (folder / "model" / "weights.safetensors").write_bytes(b"\0" * 1024)
        print(folder, flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    main()
