"""Hugging Face downloads through huggingface_hub, against a fake Hub (and CDN) on loopback."""

from __future__ import annotations

import functools
import socket
import tempfile
from pathlib import Path

import pytest

from modelstore import Architecture, Layout, _builtin
from modelstore.errors import (
    IntegrityError,
    ModelNotFound,
    SourceUnauthenticated,
    SourceUnavailable,
    UnsafeCheckpoint,
)
from modelstore.progress import DownloadProgress
from tests.fakes import payloads
from tests.fakes.cachefs import blob_files
from tests.fakes.hub import FakeCDN, FakeHub
from tests.modelstore.conftest import HF_TOKEN, MakeStore

REPO = "acme/sdxl-base"


@functools.cache
def _tiny_base_files() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        _builtin.build(_builtin.BUILTIN_MODELS["builtin:tiny-sdxl-base@1"], folder)
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def sdxl_repo() -> dict[str, bytes]:
    """A diffusers-format SDXL base repository laid out like stabilityai's: configs, tokenizers and weights
    (the tiny built-in base's, so the weights' headers really describe an SDXL base) as the fp16 variant, other
    weights under the plain names, and the things an SDXL pipeline does not need."""
    files: dict[str, bytes] = {}
    for seed, (name, data) in enumerate(sorted(_tiny_base_files().items())):
        if name.endswith(".safetensors"):
            files[name.replace(".safetensors", ".fp16.safetensors")] = data
            files[name] = payloads.checkpoint(seed=100 + seed)
        else:
            files[name] = data
    files["text_encoder/pytorch_model.bin"] = payloads.pickle_checkpoint()
    files["text_encoder/flax_model.msgpack"] = b"\x81\xa4flax"
    files["sd_xl_base_1.0.safetensors"] = payloads.checkpoint("base", seed=300)
    files["vae_1_0/diffusion_pytorch_model.safetensors"] = payloads.checkpoint(seed=301)
    files["README.md"] = b"# SDXL\n"
    return files


def test_a_diffusers_repo_fetches_only_what_sdxl_needs(make_store: MakeStore, hub: FakeHub) -> None:
    files = sdxl_repo()
    hub.add_repo(REPO, files)
    store = make_store()
    events: list[DownloadProgress] = []

    record = store.resolve(f"hf:{REPO}", progress=events.append)

    assert record.layout is Layout.DIFFUSERS and record.architecture is Architecture.SDXL_BASE
    fetched = set(hub.file_gets(REPO))
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fetched  # the fp16 variant where it exists
    assert not fetched & {
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/pytorch_model.bin",
        "text_encoder/flax_model.msgpack",
        "sd_xl_base_1.0.safetensors",
        "vae_1_0/diffusion_pytorch_model.safetensors",
        "README.md",
    }
    assert {"model_index.json", "scheduler/scheduler_config.json", "tokenizer_2/merges.txt"} <= fetched
    # The folder the loader opens has the plain names, with the fp16 bytes behind them.
    unet = record.path / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.read_bytes() == files["unet/diffusion_pytorch_model.fp16.safetensors"]
    assert (record.path / "tokenizer" / "vocab.json").read_bytes() == files["tokenizer/vocab.json"]
    assert events[-1].finished and events[-1].bytes_done == events[-1].bytes_total > 0

    # Cached: no further word with the Hub at all, and the same after a restart with downloads off.
    before = len(hub.requests)
    assert store.resolve(f"hf:{REPO}") == record
    assert make_store(offline=True).resolve(f"hf:{REPO}").path == record.path
    assert len(hub.requests) == before


def test_a_single_file_in_a_repo(make_store: MakeStore, hub: FakeHub) -> None:
    refiner = payloads.checkpoint("refiner", seed=1)
    hub.add_repo("acme/refiner", {"sd_xl_refiner_1.0.safetensors": refiner, "other.safetensors": b"x" * 64})

    record = make_store().resolve("hf:acme/refiner@main+sd_xl_refiner_1.0.safetensors")

    assert record.layout is Layout.SINGLE_FILE and record.architecture is Architecture.SDXL_REFINER
    assert record.path.read_bytes() == refiner and record.sha256 == payloads.sha256(refiner)
    assert hub.file_gets("acme/refiner") == ["sd_xl_refiner_1.0.safetensors"]


def test_a_corrupted_file_is_refused_and_nothing_is_cached(
    make_store: MakeStore, hub: FakeHub, cache_dir: Path
) -> None:
    published = payloads.checkpoint("base", seed=2)
    repo = hub.add_repo("acme/single", {"model.safetensors": published})
    # Same size, different bytes: huggingface_hub's own size check would let this through.
    repo.served_instead["model.safetensors"] = published[:-16] + b"\x01" * 16
    store = make_store()
    with pytest.raises(IntegrityError, match="SHA256 mismatch"):
        store.resolve("hf:acme/single+model.safetensors")
    assert store.list_models() == [] and blob_files(cache_dir) == []


def test_a_corrupted_config_is_refused(make_store: MakeStore, hub: FakeHub, cache_dir: Path) -> None:
    repo = hub.add_repo(REPO, sdxl_repo())
    repo.served_instead["unet/config.json"] = repo.files["unet/config.json"].replace(
        b"silu", b"gelu"
    )  # same size, other bytes
    store = make_store()
    with pytest.raises(IntegrityError, match="git hash"):
        store.resolve(f"hf:{REPO}")
    assert store.list_models() == []


def test_the_token_reaches_the_hub_and_not_its_cdn(make_store: MakeStore, cdn: FakeCDN) -> None:
    hub = FakeHub(token=HF_TOKEN, cdn=cdn)
    try:
        data = payloads.checkpoint("base", seed=3)
        hub.add_repo("acme/private", {"model.safetensors": data}, private=True)

        record = make_store(hf_endpoint=hub.url).resolve("hf:acme/private+model.safetensors")

        assert record.path.read_bytes() == data
        assert all(r.headers.get("authorization") == f"Bearer {HF_TOKEN}" for r in hub.requests)
        assert cdn.requests and all("authorization" not in r.headers for r in cdn.requests)
    finally:
        hub.close()


def test_hub_errors(make_store: MakeStore, hub: FakeHub) -> None:
    hub.add_repo("acme/private", {"model.safetensors": payloads.checkpoint()}, private=True)
    hub.add_repo("acme/flat", {"model.safetensors": payloads.checkpoint()})
    anonymous = make_store(hf_token=None)
    with pytest.raises(SourceUnauthenticated, match="HF_TOKEN"):
        anonymous.resolve("hf:acme/private+model.safetensors")
    with pytest.raises(ModelNotFound, match="not found"):
        anonymous.resolve("hf:acme/missing")
    with pytest.raises(ModelNotFound, match="no revision"):
        anonymous.resolve("hf:acme/flat@v9+model.safetensors")
    with pytest.raises(ModelNotFound, match=r"nope\.safetensors is not in"):
        anonymous.resolve("hf:acme/flat+nope.safetensors")
    with pytest.raises(ModelNotFound, match="not a diffusers-format repository"):
        anonymous.resolve("hf:acme/flat")
    assert hub.file_gets("acme/flat") == []


def test_a_repo_with_only_pickled_weights_is_refused_before_downloading(make_store: MakeStore, hub: FakeHub) -> None:
    files = {p: b for p, b in sdxl_repo().items() if not p.startswith("unet/diffusion_pytorch_model")}
    files["unet/diffusion_pytorch_model.bin"] = payloads.pickle_checkpoint()
    hub.add_repo(REPO, files)
    with pytest.raises(UnsafeCheckpoint, match="unet/ has no safetensors"):
        make_store().resolve(f"hf:{REPO}")
    assert hub.file_gets(REPO) == []


def test_an_unreachable_hub_is_one_line_without_the_token(make_store: MakeStore) -> None:
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = make_store(hf_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(SourceUnavailable, match="could not be reached") as caught:
        store.resolve(f"hf:{REPO}")
    assert "\n" not in caught.value.message and HF_TOKEN not in caught.value.message
