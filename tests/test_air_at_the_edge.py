"""A request's models are parsed once, at the edge: the job carries the AIRs validation parsed, and the store
receives those very values (issue 16: no text -> AIR -> text -> AIR on the way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelstore import AIR, Architecture, Component, DownloadCause, Layout, ModelRecord, ProgressCallback, parse_air
from refinery.v1 import generation_pb2 as pb
from server.api.validation import job_from_request
from server.core.domain import PairKey
from server.core.settings import DEFAULT_PAIR, Limits
from server.scheduling.leases import LeaseSet
from server.scheduling.resolver import Resolver

URN = "urn:air:sdxl:checkpoint:civitai:101055@128078"
SHORT = "civitai:101055@128078"


class RecordingStore:
    """The store's side of resolving, recording the model values it is handed."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def acquire(self, model: object) -> str:
        self.seen.append(("acquire", model))
        return str(model)

    def release(self, model: object) -> None:
        self.seen.append(("release", model))

    def resolve(
        self, model: AIR, *, progress: ProgressCallback | None = None, give_up: Any = None, cause: Any = None
    ) -> ModelRecord:
        self.seen.append(("resolve", model))
        return ModelRecord(model, Path("/nonexistent"), Layout.DIFFUSERS, Architecture.SDXL_BASE, 0, "0" * 64)

    def components(self, record: ModelRecord, progress: ProgressCallback | None = None) -> tuple[Component, ...]:
        return ()


def test_two_spellings_of_one_model_are_one_key() -> None:
    """Pairs, batches and affinity key on AIRs: the URN and the short form must be the same key."""
    urn, short = parse_air(URN), parse_air(SHORT)
    assert urn == short and hash(urn) == hash(short)
    assert PairKey(urn, None) == PairKey(short, None) and len({PairKey(urn, None), PairKey(short, None)}) == 1
    assert parse_air(urn.canonical) == urn


def test_the_store_receives_the_airs_the_edge_parsed() -> None:
    request = pb.GenerateRequest(positive_prompt="a cat", model=URN, refiner=pb.Refiner())
    job = job_from_request(
        request, limits=Limits(), default_model=DEFAULT_PAIR.base, default_refiner=DEFAULT_PAIR.refiner
    )
    pair = job.pair
    assert isinstance(pair.base, AIR) and isinstance(pair.refiner, AIR)
    assert pair.refiner is DEFAULT_PAIR.refiner  # the server's default, parsed once at start-up

    store = RecordingStore()
    leases = LeaseSet(store)
    spec = Resolver(store).pair_spec(pair, leases, cause=DownloadCause.request("r-1"))  # type: ignore[arg-type]
    leases.release_all()

    for verb in ("acquire", "resolve", "release"):
        handed = [model for seen, model in store.seen if seen == verb]
        assert len(handed) == 2 and handed[0] is pair.base and handed[1] is pair.refiner, (verb, handed)
    assert spec.base.record.air is pair.base
