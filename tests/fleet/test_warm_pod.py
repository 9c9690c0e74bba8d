"""A new replica starts warm from the fleet's shared, read-only model cache (issue 20).

The cache is filled once, as the pull Job fills the shared volume (`refinery models pull` of the pair); the
fleet's three replicas use it read-only, and a fourth replica, started later as a scale-up would start a pod,
pins the pair from it with the cache bind-mounted read-only (deploy/local/read_only.py; the kernel refuses
any write). It reaches SERVING with zero downloads, serves a request, and the cache's tree (names, sizes,
modes, modification times) is unchanged. `benchmarks/bench_warm_pod.py` measures warm against cold starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deploy.local import read_only
from deploy.local.fleet import Fleet, FleetSettings, free_ports
from deploy.local.replica import Replica, ReplicaSpec
from modelstore import ModelStore, StoreSettings
from refinery.client import Client, Image
from tests.fleet.conftest import needs_nginx

BASE, REFINER = "builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-refiner@1"
pytestmark = [
    needs_nginx,
    pytest.mark.skipif(not read_only.available(), reason="no unprivileged read-only bind mount here (unshare)"),
]


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_size, st.st_mode, st.st_mtime_ns)
    return found


def fill(cache: Path) -> None:
    """What the pull Job does: pull (download or build, verify) and measure each model of the pair."""
    store = ModelStore(StoreSettings(cache_dir=cache))
    try:
        for model in (BASE, REFINER):
            store.components(store.pull(model))
    finally:
        store.close()


def test_a_fourth_replica_starts_serving_from_the_shared_read_only_cache(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    fill(shared)
    before = tree(shared)
    quick_stop = {"REFINERY_DRAIN_DELAY": "0"}  # no balancer polls health here
    settings = FleetSettings(
        replicas=3, run_dir=tmp_path / "fleet", cache_dir=shared, env={"REFINERY_CACHE_READ_ONLY": "1", **quick_stop}
    )
    with Fleet(settings) as fleet:
        port, metrics_port = free_ports("127.0.0.1", 2)
        spec = ReplicaSpec(
            "replica-3", "127.0.0.1", port, metrics_port, shared, fleet.run_dir / "replica-3.log",
            pins=f"{BASE}+{REFINER}", cache_read_only=True, prefix=read_only.read_only_prefix(shared), env=quick_stop,
        )  # fmt: skip
        fourth = Replica(spec)
        started = time.monotonic()
        fourth.start()
        try:
            fourth.wait_ready(60)
            print(f"fourth replica: start to SERVING in {time.monotonic() - started:.1f} s (warm, read-only)")
            assert fourth.total("refinery_downloads_total") == 0
            with Client(fourth.address, resend=None) as client:
                events = list(client.generate("a lighthouse", steps=4, width=64, height=64, timeout=60))
            assert any(isinstance(e, Image) for e in events)
            with Client(fleet.front, resend=None) as client:  # the fleet serves from it too
                events = list(client.generate("a red bicycle", steps=4, width=64, height=64, timeout=60))
            assert any(isinstance(e, Image) for e in events)
        finally:
            fourth.stop()
        assert fourth.wait() == 0, fourth.log_tail(20)
        assert "cached builtin" not in spec.log_path.read_text()  # nothing was built (downloaded) into a cache
    assert tree(shared) == before
