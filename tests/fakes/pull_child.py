"""Pull one model in a process of its own (for kill -9 and two-process tests):

    python -m tests.fakes.pull_child CACHE_DIR CIVITAI_API MODEL

Prints the record's path and sha256 as JSON on success."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from modelstore import ModelStore, StoreSettings


def main() -> None:
    cache_dir, api, model = sys.argv[1:4]
    store = ModelStore(StoreSettings(cache_dir=Path(cache_dir), civitai_api=api))
    record = store.resolve(model)
    print(json.dumps({"path": str(record.path), "sha256": record.sha256}))


if __name__ == "__main__":
    main()
