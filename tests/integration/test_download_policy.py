"""Downloads are the operator's decision (issue 21, item 2), through a real server and a fake civitai.

Twelve requests naming twelve versions once caused twelve downloads, which under a quota evicted the
operator's own model, and a model that then failed validation stayed in the cache. Now: by default a request
downloads nothing (an operator pulls or pins first); with an allow-list it downloads only what matches, may
evict only what requests brought in, and a model nothing can run leaves nothing behind; each download is
logged and counted with who caused it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from modelstore import ModelStore, OnDemandPolicy, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import models_pb2, models_pb2_grpc
from tests.fakes import payloads
from tests.fakes.cachefs import blob_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage

from .conftest import TIMEOUT_S, ServerThread, bad_request_fields, collect, make_settings, new_stub

OPERATORS = "civitai:9@90"


def add(civitai: FakeCivitai, model: int, version: int, kind: str = "base", extra_bytes: int = 0) -> int:
    """A one-file version on the fake civitai; its size."""
    data = payloads.checkpoint(kind, seed=version, extra_bytes=extra_bytes)
    civitai.add_version(model, version, [(FakeFile(version * 10, f"m{version}.safetensors"), data)])
    return len(data)


class Server:
    def __init__(self, settings: StoreSettings) -> None:
        self.store = ModelStore(settings)
        self.thread = ServerThread(make_settings(settings, pins=(), default_refiner=None), store=self.store)
        self.channel = grpc.insecure_channel(self.thread.address)
        self.generation = new_stub(self.channel)
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def generate(self, model: str, request_id: str) -> grpc.RpcError | None:
        """The error a request naming `model` ends with (its fake weights never load), or None."""
        request = pb.GenerateRequest(request_id=request_id, positive_prompt="a cat", model=model, steps=2)
        try:
            collect(self.generation, request)
        except grpc.RpcError as exc:
            return exc
        return None

    def pull(self, model: str) -> None:
        list(self.models.PullModel(models_pb2.PullModelRequest(model=model), timeout=TIMEOUT_S))

    def cached(self) -> set[str]:
        return {m.air for m in self.store.list_models()}

    def downloads(self, cause: str) -> float:
        page = generate_latest(self.thread.server.metrics.registry).decode()
        line = next(x for x in page.splitlines() if x.startswith(f'refinery_downloads_total{{cause="{cause}"}}'))
        return float(line.split()[-1])

    def close(self) -> None:
        self.channel.close()
        self.thread.close()
        self.store.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.close()


def test_by_default_a_request_downloads_nothing_until_an_operator_pulls_the_model(
    tmp_path: Path, civitai: FakeCivitai, storage: FakeStorage, servers: list[Server]
) -> None:
    add(civitai, 1, 10)
    server = Server(StoreSettings(cache_dir=tmp_path / "cache", civitai_api=civitai.url))
    servers.append(server)

    refused = server.generate("civitai:1@10", "r-1")
    assert refused is not None and refused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert bad_request_fields(refused) == ["model"]
    assert "on-demand downloads: none" in (refused.details() or "")
    # Refused before anything was asked of civitai or written to the cache.
    assert civitai.downloads() == [] and storage.gets() == [] and blob_files(tmp_path / "cache") == []

    server.pull("civitai:1@10")
    after = server.generate("civitai:1@10", "r-2")  # resolved from the cache now (its fake weights never load)
    assert after is None or "on-demand" not in (after.details() or "")
    assert len(storage.gets()) == 1
    assert (server.downloads("pull"), server.downloads("request"), server.downloads("pin")) == (1, 0, 0)


def test_an_allow_list_lets_requests_download_only_what_matches_and_never_evict_the_operators_models(
    tmp_path: Path,
    civitai: FakeCivitai,
    storage: FakeStorage,
    servers: list[Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="modelstore")
    size = add(civitai, 9, 90)
    for version in (10, 11, 12):
        add(civitai, 1, version)
    add(civitai, 2, 20)
    big = add(civitai, 1, 13, extra_bytes=size)  # fits the quota only if the operator's model goes
    quota = 2 * size + size // 2  # the operator's model and one of the requests'
    assert big + size > quota >= big
    settings = StoreSettings(
        cache_dir=tmp_path / "cache",
        civitai_api=civitai.url,
        max_bytes=quota,
        on_demand=OnDemandPolicy.parse("civitai:1@*"),
        min_free_bytes=0,
    )
    server = Server(settings)
    servers.append(server)
    server.pull(OPERATORS)

    for version in (10, 11, 12):  # each evicts the one before: requests' downloads make room among themselves
        error = server.generate(f"civitai:1@{version}", f"r-{version}")
        assert error is None or "on-demand" not in (error.details() or "")
        assert server.cached() == {OPERATORS, f"civitai:1@{version}"}
    assert "downloading civitai:1@11 from civitai for request r-11" in caplog.text

    outside = server.generate("civitai:2@20", "r-20")
    assert outside is not None and outside.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert bad_request_fields(outside) == ["model"]

    too_big = server.generate("civitai:1@13", "r-13")  # would need the operator's room
    assert too_big is not None and too_big.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert OPERATORS in server.cached()
    assert (server.downloads("pull"), server.downloads("request")) == (1, 3)
    assert [r.path for r in storage.gets()].count("/bucket/20-200") == 0


def test_a_model_a_request_downloaded_that_nothing_can_run_leaves_nothing_in_the_cache(
    tmp_path: Path, civitai: FakeCivitai, servers: list[Server]
) -> None:
    add(civitai, 3, 30, kind="plain")  # a checkpoint of no architecture this server runs
    settings = StoreSettings(
        cache_dir=tmp_path / "cache", civitai_api=civitai.url, on_demand=OnDemandPolicy.parse("any")
    )
    server = Server(settings)
    servers.append(server)

    error = server.generate("civitai:3@30", "r-30")
    assert error is not None and error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert bad_request_fields(error) == ["model"]
    assert server.cached() == set()
    assert blob_files(tmp_path / "cache") == []
