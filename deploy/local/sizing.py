"""Measure what each pair costs in memory on a replica, so fleet budgets come from the server, not guesses.

One replica with room for everything loads each pair once; `refinery_resident_bytes` after each load, less
before, is that pair's size (pairs that share components by content would show less: the tests' pairs share
none). `budget_for` then gives room for `per_replica` pairs but not one more.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from deploy.local.fleet import free_ports
from deploy.local.replica import Replica, ReplicaSpec
from deploy.local.traffic import CHANNEL_OPTIONS, Pair, generate, generation_stub


def measure(pairs: Sequence[Pair], cache_dir: Path, run_dir: Path, host: str = "127.0.0.1") -> dict[Pair, int]:
    """Resident bytes each pair adds on a fresh CPU replica (which also leaves the models built in `cache_dir`)."""
    port, metrics_port = free_ports(host, 2)
    replica = Replica(ReplicaSpec("measure", host, port, metrics_port, cache_dir, run_dir / "measure.log"))
    replica.start()
    try:
        replica.wait_ready()
        sizes: dict[Pair, int] = {}
        with grpc.insecure_channel(replica.address, options=CHANNEL_OPTIONS) as channel:
            stub = generation_stub(channel)
            for pair in pairs:
                before = replica.total("refinery_resident_bytes")
                outcome = generate(stub, pair)
                if not outcome.ok:
                    raise RuntimeError(f"measuring {pair}: {outcome.code.name} {outcome.details}")
                sizes[pair] = int(replica.total("refinery_resident_bytes") - before)
        return sizes
    finally:
        replica.stop()


def budget_for(sizes: dict[Pair, int], per_replica: int) -> int:
    """Bytes that hold any `per_replica` of the pairs but never `per_replica + 1` (halfway between the two)."""
    ordered = sorted(sizes.values())
    if len(ordered) <= per_replica:
        raise ValueError(f"need more than {per_replica} pairs, got {len(ordered)}")
    largest = sum(ordered[-per_replica:])
    smallest_more = sum(ordered[: per_replica + 1])
    if smallest_more <= largest:
        raise ValueError("these pair sizes leave no budget between 'fits' and 'does not fit'")
    return (largest + smallest_more) // 2
