"""The model-store issue's headline, end to end through gRPC:

    `Generate` with `model: "civitai:101055@128078"` and `refiner.model: "civitai:101055@128080"` just works:
    the first request downloads both checkpoints once, every later request finds them cached, and after that
    the service runs with no network at all.

Since issue 21 a request downloads only on a server whose operator allows it (`on_demand`, off by default):
these servers opt in (`ON_DEMAND`); tests/integration/test_download_policy.py covers the default.

The checkpoints are the tiny built-in base and refiner written as single files in the original key layout, as
civitai ships SDXL, served by the fake civitai API and its separate storage host. Each version also lists a
VAE that civitai marks primary, which must never be the file downloaded.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from modelstore import ModelStore, OnDemandPolicy, StoreSettings
from modelstore._builtin import BUILTIN_MODELS, build
from refinery.v1 import generation_pb2 as pb
from tests.fakes import payloads
from tests.fakes.cachefs import partial_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage
from tests.fixtures.ldm_layout import write_single_file

from .conftest import TIMEOUT_S, ServerThread, collect, events, make_settings, new_stub, wait_for_download_to_stop

BASE = "civitai:101055@128078"
REFINER = "civitai:101055@128080"
BASE_FILE, REFINER_FILE = 126002, 126004
ON_DEMAND = OnDemandPolicy.parse("any")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """The tiny built-in base and refiner as civitai-style single-file checkpoints."""
    tmp = tmp_path_factory.mktemp("civitai-checkpoints")
    files = []
    for name in ("builtin:tiny-sdxl-base@1", "builtin:tiny-sdxl-refiner@1"):
        folder = tmp / name.split(":")[1]
        build(BUILTIN_MODELS[name], folder)
        files.append(write_single_file(folder, tmp / f"{folder.name}.safetensors").read_bytes())
    return files[0], files[1]


@pytest.fixture
def storage() -> Iterator[FakeStorage]:
    server = FakeStorage()
    yield server
    server.close()


@pytest.fixture
def civitai(storage: FakeStorage, checkpoints: tuple[bytes, bytes]) -> Iterator[FakeCivitai]:
    server = FakeCivitai(storage)
    base, refiner = checkpoints
    vae = payloads.checkpoint("plain", seed=3)
    server.add_version(
        101055,
        128078,
        [
            (FakeFile(126001, "sdxl_vae.safetensors", type="VAE", primary=True), vae),
            (FakeFile(BASE_FILE, "sd_xl_base_1.0.safetensors", size="full"), base),
        ],
    )
    server.add_version(
        101055,
        128080,
        [
            (FakeFile(126003, "sdxl_vae.safetensors", type="VAE", primary=True), vae),
            (FakeFile(REFINER_FILE, "sd_xl_refiner_1.0.safetensors", size="full"), refiner),
        ],
        base_model_type="Refiner",
    )
    yield server
    server.close()


def generate(settings: StoreSettings) -> tuple[list[pb.Image], list[pb.ModelLoading]]:
    """Two Generate calls with the civitai pair on a freshly started server (a new ModelStore, like a new
    process) over the cache in `settings`; the images of both, and the first call's model_loading events."""
    store = ModelStore(settings)
    thread = ServerThread(make_settings(settings, pins=()), store=store)
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = new_stub(channel)
            images = []
            loading: list[pb.ModelLoading] = []
            for seed in (7, 8):
                request = pb.GenerateRequest(
                    positive_prompt="a lighthouse on a cliff",
                    model=BASE,
                    refiner=pb.Refiner(model=REFINER, start_step=4),
                    steps=6,
                    seed=seed,
                )
                responses = collect(stub, request)
                images.extend(events(responses, "image"))
                if seed == 7:
                    loading = events(responses, "model_loading")
            return images, loading
    finally:
        thread.close()
        store.close()


def pixels(image: pb.Image) -> bytes:
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.size == (64, 64)
        return decoded.convert("RGB").tobytes()


def test_the_civitai_pair_downloads_once_and_then_runs_with_no_network(
    tmp_path: Path, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    settings = StoreSettings(cache_dir=tmp_path / "cache", civitai_api=civitai.url, on_demand=ON_DEMAND)

    online, loading = generate(settings)

    assert [(i.model, i.refiner_model, i.base_steps, i.refiner_steps) for i in online] == [
        (BASE, REFINER, 3, 3),
        (BASE, REFINER, 3, 3),
    ]
    # One GET per checkpoint, for the model files (never the VAEs civitai marks primary).
    assert sorted(r.path for r in storage.gets()) == [
        f"/bucket/128078-{BASE_FILE}",
        f"/bucket/128080-{REFINER_FILE}",
    ]
    assert sorted(r.query["fileId"] for r in civitai.downloads()) == [str(BASE_FILE), str(REFINER_FILE)]
    # The first request's stream showed each download with bytes, ending at the file's size, before loading.
    for model, role in ((BASE, pb.MODEL_ROLE_BASE), (REFINER, pb.MODEL_ROLE_REFINER)):
        downloading = [m for m in loading if m.model == model and m.phase == pb.ModelLoading.PHASE_DOWNLOADING]
        assert downloading and all(m.role == role for m in downloading)
        done = downloading[-1]
        assert done.bytes_total > 0 and done.bytes_done == done.bytes_total
        assert [m.bytes_done for m in downloading] == sorted(m.bytes_done for m in downloading)

    civitai.close()
    storage.close()  # from here on, any request to either would be refused
    offline, loading = generate(settings)  # a restarted service over the same cache
    assert not [m for m in loading if m.phase == pb.ModelLoading.PHASE_DOWNLOADING]

    assert [pixels(i) for i in offline] == [pixels(i) for i in online]
    assert pixels(online[0]) != pixels(online[1])  # two seeds, two images: the comparison means something


def test_a_request_cancelled_while_its_model_downloads_stops_the_download(
    tmp_path: Path,
    civitai: FakeCivitai,
    storage: FakeStorage,
    checkpoints: tuple[bytes, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="modelstore.store")
    link = civitai.object_of(128078, BASE_FILE)
    link.trickle_s = 0.01  # a slow link: the whole file would take seconds
    settings = StoreSettings(cache_dir=tmp_path / "cache", civitai_api=civitai.url, on_demand=ON_DEMAND)
    store = ModelStore(settings)
    thread = ServerThread(make_settings(settings, pins=()), store=store)
    request = pb.GenerateRequest(
        positive_prompt="a lighthouse", model=BASE, refiner=pb.Refiner(model=REFINER, start_step=4), steps=6
    )
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = new_stub(channel)
            call = stub.Generate(request, timeout=TIMEOUT_S)
            for response in call:
                loading = response.model_loading
                if response.WhichOneof("event") == "model_loading" and loading.bytes_done > 0:
                    break  # the base is on its way
            call.cancel()  # the client gives up while the model downloads

            wait_for_download_to_stop(caplog, BASE)
            (partial,) = partial_files(settings.cache_dir)
            kept = partial.stat().st_size
            assert 0 < kept < len(checkpoints[0])
            assert [r.path for r in storage.gets()] == [f"/bucket/128078-{BASE_FILE}"]  # the refiner never started

            link.trickle_s = 0.0
            assert len(events(collect(stub, request), "image")) == 1
            base_gets = [r for r in storage.gets() if r.path == f"/bucket/128078-{BASE_FILE}"]
            assert [r.headers.get("range") for r in base_gets] == [None, f"bytes={kept}-"]  # resumed
    finally:
        thread.close()
        store.close()
