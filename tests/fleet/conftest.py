"""The local fleet under test: 3 `refinery serve` replicas behind nginx, on loopback.

Every test here needs nginx (Debian's nginx-light; `.ci/fleet.sh` installs it) and skips with that reason
without it. Budgets are measured, not guessed: one replica loads each tiny pair once and reports its resident
bytes, and each fleet replica then gets room for any two pairs but not all three.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local import sizing
from deploy.local.fleet import Fleet, FleetSettings
from deploy.local.nginx import nginx_binary
from deploy.local.traffic import Pair

# Three pairs with nothing in common in memory (the @2 and @3 bases have their own random weights).
PAIRS = (
    Pair("builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-refiner@1"),
    Pair("builtin:tiny-sdxl-base@2"),
    Pair("builtin:tiny-sdxl-base@3"),
)
PAIRS_PER_REPLICA = 2

NO_NGINX = "nginx is not installed (apt-get install nginx-light; .ci/fleet.sh does it)"
needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason=NO_NGINX)


@pytest.fixture(scope="session")
def fleet_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for every fleet of the session (the replicas share it: a local disk honours flock)."""
    return tmp_path_factory.mktemp("fleet-cache")


@pytest.fixture(scope="session")
def pair_budget(fleet_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Room for any two of the pairs but not all three, from the sizes one replica reports."""
    if nginx_binary() is None:
        pytest.skip(NO_NGINX)
    sizes = sizing.measure(PAIRS, fleet_cache, tmp_path_factory.mktemp("measure"))
    assert all(size > 0 for size in sizes.values()), f"pairs must not share components: {sizes}"
    return sizing.budget_for(sizes, PAIRS_PER_REPLICA)


def fleet_settings(budget: int, cache: Path, run_dir: Path) -> FleetSettings:
    """3 replicas whose budgets hold two of the pairs each, behind nginx hashing on `refinery-pair`.

    Replica names (their ports) are drawn so that the ring puts at most two of the three pairs on any replica,
    as an operator picks names or weights for a known set of pairs; a consistent hash cannot promise it alone.
    """
    return FleetSettings(
        replicas=3,
        budget=str(budget),
        grace_s=30.0,
        run_dir=run_dir,
        cache_dir=cache,
        spread=tuple(p.key for p in PAIRS),
        per_replica=PAIRS_PER_REPLICA,
    )


@pytest.fixture
def fleet(pair_budget: int, fleet_cache: Path, tmp_path: Path) -> Iterator[Fleet]:
    """A fresh fleet for one test (the failover tests kill and stop its replicas)."""
    with Fleet(fleet_settings(pair_budget, fleet_cache, tmp_path / "fleet")) as running:
        yield running
