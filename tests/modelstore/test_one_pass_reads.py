"""One read per weight file, as the kernel counts it (issue 19): a process that resolves a cached model with
the server's kind of store and loads it, traced by strace, maps each weight file once, whole (the mapping its
check hashes through and its tensors are views of), and read()s no more of it than its header (which the
architecture check reads first). Before, the start read each file whole for its check, and safetensors then
mapped it again for the load.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from modelstore import ModelStore, StoreSettings
from modelstore._safetensors_header import read_header
from tests.conftest import TINY_BASE
from tests.integration.test_damaged_models import copy_cache

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="counts reads with strace")

ROOT = Path(__file__).resolve().parents[2]
LOAD = """
import sys
from pathlib import Path
from modelstore import ModelStore, Role, StoreSettings, load_pipeline
store = ModelStore(StoreSettings(cache_dir=Path(sys.argv[1]), offline=True), check_weights_when_loaded=True)
load_pipeline(store.resolve(sys.argv[2]), role=Role.BASE, device="cpu")
store.close()
"""
READ = re.compile(r"^\d+\s+(?:read|pread64|readv|preadv)\(\d+<(?P<path>[^>]*)>.*\) = (?P<n>\d+)$")
MMAP = re.compile(r"^\d+\s+mmap\([^,]*, (?P<n>\d+), [^,]*, [^,]*, \d+<(?P<path>[^>]*)>")


def traced(cache: Path, tmp_path: Path) -> tuple[Counter[str], Counter[str]]:
    """Bytes read and mapped per file by a process that resolves and loads the tiny base from `cache`."""
    trace = tmp_path / "trace"
    command = ["strace", "-f", "-qq", "-y", "-s", "0", "-e", "trace=read,pread64,readv,preadv,mmap", "-o", str(trace)]
    subprocess.run([*command, sys.executable, "-c", LOAD, str(cache), TINY_BASE], cwd=ROOT, check=True, timeout=300)
    read: Counter[str] = Counter()
    mapped: Counter[str] = Counter()
    for line in trace.read_text(errors="replace").splitlines():
        if m := READ.match(line):
            read[m["path"]] += int(m["n"])
        elif m := MMAP.match(line):
            mapped[m["path"]] += int(m["n"])
    return read, mapped


def test_each_weight_file_is_mapped_once_and_only_its_header_read(
    tmp_path: Path, store_settings: StoreSettings, model_store: ModelStore
) -> None:
    folder = model_store.resolve(TINY_BASE).path
    cache = copy_cache(store_settings.cache_dir, tmp_path / "cache")
    weights = [(cache / p.relative_to(store_settings.cache_dir)).resolve() for p in folder.rglob("*.safetensors")]

    read, mapped = traced(cache, tmp_path)

    assert len(weights) == 4
    for blob in weights:
        size, header = blob.stat().st_size, read_header(blob).data_offset
        assert mapped[str(blob)] == size, blob  # once: hashed through, then the tensors' memory
        assert read[str(blob)] <= header + 8192, blob  # its header, for the architecture check
