"""Issue 13, finding 1: a remote client cannot probe the server's file system through model names.

Every hostile path, sent in every field that names a model, gets the same answer byte for byte (status,
message, details), whatever is at the path; nothing it named is registered or listed; a model under a root
the operator allowed still works; and the CLI's own in-process server accepts the caller's files.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from refinery.v1 import models_pb2, models_pb2_grpc, status_pb2, status_pb2_grpc
from server.core.settings import Security
from tests.fakes import payloads
from tests.fixtures.tiny import TINY_BASE, another_base
from tests.integration.conftest import ServerThread, bad_request_fields, make_settings

from .conftest import TIMEOUT_S, Answer, answer_of, env_for_cli, refinery


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, model_store: ModelStore) -> dict[str, Path]:
    """An allowed root, a real model inside it, and a folder outside it full of things worth probing."""
    top = tmp_path_factory.mktemp("places")
    allowed, outside = top / "allowed", top / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(payloads.checkpoint("base", seed=5))
    secret = outside / "shadow"
    secret.write_bytes(b"root:*:20000:0:99999:7:::\n")
    secret.chmod(0)
    os.mkfifo(outside / "fifo")
    (allowed / "escape.safetensors").symlink_to(outside / "model.safetensors")
    (allowed / "escape-dir").symlink_to(outside)
    return {
        "allowed": allowed,
        "outside": outside,
        "good": Path(another_base(model_store, allowed).removeprefix("local:")),
        "outside_model": Path(another_base(model_store, outside).removeprefix("local:")),
    }


def hostile_paths(places: dict[str, Path]) -> list[str]:
    outside, allowed = places["outside"], places["allowed"]
    return [
        str(outside / "model.safetensors"),  # an existing single-file checkpoint
        f"local:{places['outside_model']}",  # an existing diffusers folder, a model the store would take
        str(outside / "missing.safetensors"),  # nothing there
        str(outside),  # a directory that is not a model
        "/dev/null",  # a device
        str(outside / "fifo"),  # a FIFO: opening it would block a reader forever
        str(allowed / "escape.safetensors"),  # a symlink inside the allowed root, pointing out of it
        f"local:{allowed}/escape-dir/model.safetensors",  # a path through a symlinked folder
        "/proc/self/environ",  # the server's own environment
        str(outside / "shadow"),  # an unreadable file, /etc/shadow-like
        "/etc/shadow",
        "local:/",
    ]


@pytest.fixture(scope="module")
def servers(
    store_settings: StoreSettings, model_store: ModelStore, places: dict[str, Path]
) -> Iterator[dict[str, str]]:
    """Two servers over one cache: one that allows local models under `allowed`, one that allows none."""
    with_root = ServerThread(
        make_settings(
            store_settings,
            pins=(),
            security=Security(local_model_roots=(places["allowed"],), trust_loopback_admin=True),
        ),
        store=model_store,
    )
    without = ServerThread(
        make_settings(store_settings, pins=(), security=Security(trust_loopback_admin=True)), store=model_store
    )
    try:
        yield {"with a root": with_root.address, "with no roots": without.address}
    finally:
        with_root.close()
        without.close()


Probe = Callable[[grpc.Channel, str], Any]


def _generate_model(channel: grpc.Channel, path: str) -> Any:
    stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub.Generate(pb.GenerateRequest(positive_prompt="a cat", model=path, steps=2), timeout=TIMEOUT_S)


def _generate_refiner(channel: grpc.Channel, path: str) -> Any:
    stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
    request = pb.GenerateRequest(positive_prompt="a cat", refiner=pb.Refiner(model=path), steps=4)
    return stub.Generate(request, timeout=TIMEOUT_S)


def _pin_pair_base(channel: grpc.Channel, path: str) -> Any:
    stub = status_pb2_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub.PinPair(status_pb2.PinPairRequest(model=path), timeout=TIMEOUT_S)


def _pin_pair_refiner(channel: grpc.Channel, path: str) -> Any:
    stub = status_pb2_grpc.ServerServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub.PinPair(status_pb2.PinPairRequest(model=TINY_BASE, refiner_model=path), timeout=TIMEOUT_S)


def _pull(channel: grpc.Channel, path: str) -> Any:
    stub = models_pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub.PullModel(models_pb2.PullModelRequest(model=path), timeout=TIMEOUT_S)


def _verify(channel: grpc.Channel, path: str) -> Any:
    stub = models_pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub.VerifyModel(models_pb2.VerifyModelRequest(model=path), timeout=TIMEOUT_S)


PROBES: dict[str, Probe] = {
    "Generate model": _generate_model,
    "Generate refiner.model": _generate_refiner,
    "PinPair model": _pin_pair_base,
    "PinPair refiner_model": _pin_pair_refiner,
    "PullModel": _pull,
    "VerifyModel": _verify,
}


def listed(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = models_pb2_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        return {m.model for m in stub.ListModels(models_pb2.ListModelsRequest(), timeout=TIMEOUT_S).models}


@pytest.mark.parametrize("probe", PROBES)
def test_every_hostile_path_gets_the_same_answer(probe: str, servers: dict[str, str], places: dict[str, Path]) -> None:
    answers: dict[tuple[str, str], Answer] = {}
    for name, address in servers.items():
        with grpc.insecure_channel(address) as channel:
            for path in hostile_paths(places):
                answers[name, path] = answer_of(functools.partial(PROBES[probe], channel, path))
    distinct = set(answers.values())
    assert len(distinct) == 1, "the answers tell the paths apart:\n" + "\n".join(
        f"{key}: {value.code.name} {value.details}" for key, value in answers.items()
    )
    (only,) = distinct
    assert only.responses == ()  # no queued or VERIFYING event: nothing was read, not even its size
    assert only.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "--local-models" in only.details


def test_nothing_a_refused_request_named_is_registered_or_listed(
    servers: dict[str, str], places: dict[str, Path]
) -> None:
    before = {name: listed(address) for name, address in servers.items()}
    for address in servers.values():
        with grpc.insecure_channel(address) as channel:
            for probe in PROBES.values():
                for path in hostile_paths(places):
                    answer_of(functools.partial(probe, channel, path))
    after = {name: listed(address) for name, address in servers.items()}
    assert after == before
    assert not any("outside" in model or model.startswith("local:/dev") for model in after["with no roots"])


def test_a_model_under_an_allowed_root_still_works(servers: dict[str, str], places: dict[str, Path]) -> None:
    model = f"local:{places['good']}"
    with grpc.insecure_channel(servers["with a root"]) as channel:
        pulled = list(_pull(channel, model))
        assert pulled[-1].model.model == model
        images = [r for r in _generate_model(channel, model) if r.WhichOneof("event") == "image"]
        assert len(images) == 1 and images[0].image.model == model
    assert model in listed(servers["with a root"])
    # The same folder is refused by the server that allows no local models, like any other path.
    with grpc.insecure_channel(servers["with no roots"]) as channel:
        refused = answer_of(lambda: _pull(channel, model))
        assert refused == answer_of(lambda: _pull(channel, "/dev/null"))


def test_the_cli_server_in_process_uses_the_callers_own_files(
    tmp_path: Path, model_store: ModelStore, store_settings: StoreSettings
) -> None:
    shutil.copytree(model_store.resolve(TINY_BASE).path, tmp_path / "mine")
    env = env_for_cli(REFINERY_CACHE_DIR=str(store_settings.cache_dir))
    done = refinery(
        "generate", "a cat", "--model", f"local:{tmp_path / 'mine'}", "--steps", "2", "-o", "cat.png",
        "--devices", "cpu", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cat.png").stat().st_size > 0


def test_a_refused_local_path_is_named_with_the_requests_other_bad_fields(
    servers: dict[str, str], places: dict[str, Path]
) -> None:
    """A client fixing its request learns every bad field at once, the refused path among them."""
    request = pb.GenerateRequest(positive_prompt="a cat", model="/etc/shadow", steps=100000, width=65)
    with grpc.insecure_channel(servers["with a root"]) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=TIMEOUT_S))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_request_fields(refused.value)) == ["model", "steps", "width"]
