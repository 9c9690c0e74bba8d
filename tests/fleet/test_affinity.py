"""Pair affinity through nginx: each pair's requests land on one replica, the one nginx's ring names, and after
warm-up requests find their pair already resident instead of loading it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from deploy.local.fleet import Fleet
from deploy.local.traffic import CHANNEL_OPTIONS, generate, generation_stub, mix
from tests.fleet.conftest import PAIRS, fleet_settings, needs_nginx

pytestmark = [needs_nginx, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(pair_budget: int, fleet_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One fleet for both tests here: they only read what happened (the tests that break a fleet get their own)."""
    with Fleet(fleet_settings(pair_budget, fleet_cache, tmp_path_factory.mktemp("affinity"))) as running:
        yield running


REQUESTS = 60
CLIENTS = 3


def test_each_pair_stays_on_its_replica_and_finds_it_warm(fleet: Fleet) -> None:
    with grpc.insecure_channel(fleet.front, options=CHANNEL_OPTIONS) as channel:
        stub = generation_stub(channel)
        warm_up = [generate(stub, pair) for pair in PAIRS]
        assert all(o.ok for o in warm_up), warm_up
        loads_before = {r.address: r.total("refinery_model_load_seconds_count") for r in fleet.replicas}

        requests = mix(PAIRS, REQUESTS, seed=7)
        with ThreadPoolExecutor(CLIENTS) as clients:
            outcomes = list(clients.map(lambda job: generate(stub, job[1], seed=job[0]), enumerate(requests)))

    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * REQUESTS
    assert all(o.images == 1 for o in outcomes)

    # Every pair's requests went to exactly one replica: the one the ring predicts from the replica names.
    replicas_by_pair: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for call in fleet.nginx.calls():
        if call.pair:  # the header-less calls of the other test
            replicas_by_pair[call.pair].add(call.upstreams)
    assert replicas_by_pair == {p.key: {(fleet.owner(p.key).address,)} for p in PAIRS}

    # After warm-up, requests reach a replica that already holds their pair: model loads counted by the replicas.
    loads = sum(r.total("refinery_model_load_seconds_count") - loads_before[r.address] for r in fleet.replicas)
    warm_hits = 1 - loads / REQUESTS
    assert warm_hits >= 0.95, f"{loads:.0f} model loads in {REQUESTS} requests after warm-up"
    assert not any(o.loaded for o in outcomes), "a request's stream showed its pair loading after warm-up"


def test_requests_without_the_header_spread_over_every_replica(fleet: Fleet) -> None:
    pair = PAIRS[1]
    with grpc.insecure_channel(fleet.front, options=CHANNEL_OPTIONS) as channel:
        stub = generation_stub(channel)
        outcomes = [generate(stub, pair, seed=i, header=False) for i in range(30)]
    assert all(o.ok for o in outcomes)
    served = {call.upstreams[-1] for call in fleet.nginx.calls() if not call.pair}
    # 30 random keys on a ring of 3: all three are hit unless one owns almost nothing (p < 3 * (2/3)**30).
    assert served == {r.address for r in fleet.replicas}
