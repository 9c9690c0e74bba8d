"""LoRAs through `refinery.v1.ModelService`: a real server on loopback pulls a civitai LoRA (fake civitai) and a
built-in one, and its listing says which models are LoRAs, what they fit and their trigger words: in the
protobuf, through the typed client, and in `refinery models pull|list`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modelstore import Architecture as StoreArchitecture
from modelstore import ModelStore, StoreSettings, require_lora
from modelstore.errors import NotALora, WrongArchitecture
from refinery.client import Architecture, Client, ModelKind
from refinery.client.models import model_info
from refinery.v1 import models_pb2 as pb
from refinery.v1 import models_pb2_grpc as pb_grpc
from server.api.boundary import rpc_error_for
from tests.conftest import CIVITAI_TOKEN, TINY_BASE
from tests.fakes.civitai import FakeCivitai, FakeFile
from tests.integration.test_cli_models import refinery
from tests.modelstore.test_loras import kohya_sdxl, lora_file

from .conftest import TIMEOUT_S, ServerThread, bad_request_fields, make_settings

LORA = "civitai:5@50"
WORDS = ["foxy style", "snowscape"]
TINY_LORA = "builtin:tiny-lora-refiner@1"


@pytest.fixture
def civitai_lora(civitai: FakeCivitai) -> bytes:
    data = lora_file(kohya_sdxl())
    civitai.add_version(5, 50, [(FakeFile(500, "fox_style.safetensors"), data)], model_type="LORA")
    civitai.versions[50]["trainedWords"] = WORDS
    return data


@pytest.fixture
def server(tmp_path: Path, civitai: FakeCivitai) -> Iterator[ServerThread]:
    store = ModelStore(
        StoreSettings(cache_dir=tmp_path / "cache", civitai_api=civitai.url, civitai_token=CIVITAI_TOKEN)
    )
    thread = ServerThread(make_settings(store.settings, pins=()), store=store)
    try:
        yield thread
    finally:
        thread.close()
        store.close()


def test_loras_are_pulled_and_listed_with_their_kind_and_trigger_words(
    server: ServerThread, civitai_lora: bytes
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.PullModelRequest(model="urn:air:sdxl:lora:civitai:5@50")
        pulled = list(stub.PullModel(request, timeout=TIMEOUT_S))[-1].model
        assert (pulled.model, pulled.kind, pulled.architecture) == (LORA, pb.MODEL_KIND_LORA, pb.ARCHITECTURE_SDXL_BASE)
        assert list(pulled.trigger_words) == WORDS and pulled.size_bytes == len(civitai_lora)
        list(stub.PullModel(pb.PullModelRequest(model=TINY_LORA), timeout=TIMEOUT_S))
        list(stub.PullModel(pb.PullModelRequest(model="builtin:tiny-sdxl-refiner@1"), timeout=TIMEOUT_S))

        rows = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT_S).models
        assert [(m.model, m.kind, m.architecture, list(m.trigger_words)) for m in rows] == [
            ("builtin:tiny-lora-refiner@1", pb.MODEL_KIND_LORA, pb.ARCHITECTURE_SDXL_REFINER, []),
            ("builtin:tiny-sdxl-refiner@1", pb.MODEL_KIND_CHECKPOINT, pb.ARCHITECTURE_SDXL_REFINER, []),
            (LORA, pb.MODEL_KIND_LORA, pb.ARCHITECTURE_SDXL_BASE, WORDS),
        ]

        # A type the store does not keep is refused at the edge, naming the field.
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.PullModel(pb.PullModelRequest(model="urn:air:sdxl:vae:civitai:5@50"), timeout=TIMEOUT_S))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(refused.value) == ["model"]

    with Client(server.address) as client:
        by_air = {m.model: m for m in client.list_models().models}
    assert (by_air[LORA].kind, by_air[LORA].architecture) == (ModelKind.LORA, Architecture.SDXL_BASE)
    assert by_air[LORA].trigger_words == tuple(WORDS)
    assert by_air["builtin:tiny-sdxl-refiner@1"].kind is ModelKind.CHECKPOINT


def test_refinery_models_shows_what_a_lora_is(tmp_path: Path, civitai: FakeCivitai, civitai_lora: bytes) -> None:
    cache = tmp_path / "cache"
    pulled = refinery("pull", "urn:air:sdxl:lora:civitai:5@50", cache=cache, civitai=civitai)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith(f"pulled {LORA} (LoRA for SDXL base, ")
    assert pulled.stdout.endswith("; trigger words: foxy style, snowscape)\n")

    listed = refinery("list", cache=cache, civitai=civitai)
    assert listed.returncode == 0, listed.stderr
    header, row, words, total = listed.stdout.splitlines()
    assert header.split()[:3] == ["MODEL", "KIND", "ARCHITECTURE"]
    assert row.split()[:4] == [LORA, "LoRA", "SDXL", "base"]
    assert words == f"trigger words of {LORA}: foxy style, snowscape"
    assert total.startswith("1 model, ")


def test_the_client_reads_a_server_from_before_loras_as_listing_checkpoints() -> None:
    assert model_info(pb.ModelInfo(model="civitai:1@2")).kind is ModelKind.CHECKPOINT  # kind unset
    lora = model_info(pb.ModelInfo(model="civitai:1@2", kind=pb.MODEL_KIND_LORA, trigger_words=["a b"]))
    assert (lora.kind, lora.trigger_words) == (ModelKind.LORA, ("a b",))
    assert model_info(pb.ModelInfo(model="civitai:1@2", kind=99)).kind is ModelKind.UNSPECIFIED  # a later kind


@pytest.mark.parametrize(
    ("model", "error"), [(TINY_BASE, NotALora), ("builtin:tiny-lora-refiner@1", WrongArchitecture)]
)
def test_a_model_that_is_not_a_lora_for_the_stage_is_failed_precondition_naming_its_field(
    model_store: ModelStore, model: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as refused:
        require_lora(model_store.resolve(model), StoreArchitecture.SDXL_BASE, field="loras[1].model")
    answer = rpc_error_for(refused.value)  # no request field matches: the error's own field is named
    assert answer.code is grpc.StatusCode.FAILED_PRECONDITION
    assert answer.message.startswith(f"loras[1].model: {model} is a ")
