"""The local fleet under test: 3 `refinery serve` replicas behind nginx, on loopback.

Every test here needs nginx (Debian's nginx-light; `.ci/fleet.sh` installs it) and skips with that reason
without it. Budgets are measured, not guessed: one replica loads each tiny pair once and reports its resident
bytes, and each fleet replica then gets room for any two pairs but not all three.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from deploy.local.fleet import Fleet, FleetSettings, free_ports
from deploy.local.nginx import nginx_binary
from deploy.local.replica import Replica, ReplicaSpec
from deploy.local.traffic import CHANNEL_OPTIONS, Pair, generate
from refinery.v1 import generation_pb2_grpc as pb_grpc

# Three pairs with nothing in common in memory (the @2 and @3 bases have their own random weights).
PAIRS = (
    Pair("builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-refiner@1"),
    Pair("builtin:tiny-sdxl-base@2"),
    Pair("builtin:tiny-sdxl-base@3"),
)
PAIRS_PER_REPLICA = 2

needs_nginx = pytest.mark.skipif(
    nginx_binary() is None, reason="nginx is not installed (apt-get install nginx-light; .ci/fleet.sh does it)"
)


@dataclass(frozen=True)
class Sizes:
    """Resident bytes of each pair on a CPU replica, and the budget that holds any two pairs but not three."""

    by_pair: dict[Pair, int]

    @property
    def budget(self) -> int:
        sizes = sorted(self.by_pair.values())
        two = sum(sizes[-PAIRS_PER_REPLICA:])
        three = sum(sizes)
        return (two + three) // 2


@pytest.fixture(scope="session")
def fleet_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for every fleet of the session (the replicas share it: a local disk honours flock)."""
    return tmp_path_factory.mktemp("fleet-cache")


@pytest.fixture(scope="session")
def pair_sizes(fleet_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Sizes:
    """Load each pair on one replica with room for all and read `refinery_resident_bytes` after each."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/fleet.sh does it)")
    port, metrics_port = free_ports("127.0.0.1", 2)
    replica = Replica(
        ReplicaSpec(
            name="measure",
            host="127.0.0.1",
            port=port,
            metrics_port=metrics_port,
            cache_dir=fleet_cache,
            log_path=tmp_path_factory.mktemp("measure") / "replica.log",
        )
    )
    replica.start()
    try:
        replica.wait_ready()
        sizes: dict[Pair, int] = {}
        with grpc.insecure_channel(replica.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for pair in PAIRS:
                before = replica.total("refinery_resident_bytes")
                outcome = generate(stub, pair)
                assert outcome.ok, outcome
                sizes[pair] = int(replica.total("refinery_resident_bytes") - before)
                assert sizes[pair] > 0, f"{pair} added nothing resident: pairs must not share components"
    finally:
        replica.stop()
    return Sizes(sizes)


@pytest.fixture
def fleet(pair_sizes: Sizes, fleet_cache: Path, tmp_path: Path) -> Iterator[Fleet]:
    """3 replicas whose budgets hold two of the pairs each, behind nginx hashing on `refinery-pair`.

    Replica names (their ports) are drawn so that the ring puts at most two of the three pairs on any replica,
    as an operator picks names or weights for a known set of pairs; a consistent hash cannot promise it alone.
    """
    settings = FleetSettings(
        replicas=3,
        budget=str(pair_sizes.budget),
        grace_s=30.0,
        run_dir=tmp_path / "fleet",
        cache_dir=fleet_cache,
        spread=tuple(p.key for p in PAIRS),
        per_replica=PAIRS_PER_REPLICA,
    )
    with Fleet(settings) as running:
        yield running
