"""civitai downloads, against a fake API and a separate fake storage host on loopback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from modelstore import Architecture, Layout
from modelstore._sources.civitai import choose_file
from modelstore.air import parse_air
from modelstore.errors import (
    IntegrityError,
    ModelNotFound,
    ModelStoreError,
    SourcePermissionDenied,
    SourceRateLimited,
    SourceUnauthenticated,
    SourceUnavailable,
    UnsafeCheckpoint,
    WrongArchitecture,
)
from modelstore.progress import DownloadProgress
from tests.fakes import payloads
from tests.fakes.cachefs import blob_files, partial_files
from tests.fakes.civitai import FakeCivitai, FakeFile, FakeStorage
from tests.modelstore.conftest import CIVITAI_TOKEN, MakeStore

BASE = "civitai:101055@128078"
REFINER = "civitai:101055@128080"


def add_sdxl_pair(civitai: FakeCivitai) -> tuple[bytes, bytes]:
    """The official SDXL pair as civitai lists it: each version also offers a VAE, marked primary here so a
    client that trusts `primary` would get the wrong file."""
    base, refiner = payloads.checkpoint("base", seed=1), payloads.checkpoint("refiner", seed=2)
    vae = payloads.checkpoint("plain", seed=3)
    civitai.add_version(
        101055,
        128078,
        [
            (FakeFile(126001, "sdxl_vae.safetensors", type="VAE", primary=True), vae),
            (FakeFile(126002, "sd_xl_base_1.0.safetensors", size="full"), base),
        ],
    )
    civitai.add_version(
        101055,
        128080,
        [
            (FakeFile(126003, "sdxl_vae.safetensors", type="VAE", primary=True), vae),
            (FakeFile(126004, "sd_xl_refiner_1.0.safetensors", size="full"), refiner),
        ],
        base_model_type="Refiner",
    )
    return base, refiner


def test_pair_downloads_once_then_runs_with_no_network(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    base_bytes, refiner_bytes = add_sdxl_pair(civitai)
    store = make_store()
    events: list[DownloadProgress] = []

    base = store.resolve(BASE, progress=events.append)
    refiner = store.resolve(REFINER, progress=events.append)

    assert (base.architecture, refiner.architecture) == (Architecture.SDXL_BASE, Architecture.SDXL_REFINER)
    assert base.layout is Layout.SINGLE_FILE and base.path.suffix == ".safetensors"
    assert base.path.read_bytes() == base_bytes and refiner.path.read_bytes() == refiner_bytes
    assert base.sha256 == payloads.sha256(base_bytes)
    # The model file was asked for explicitly, never the VAE civitai marks primary.
    assert [r.query.get("fileId") for r in civitai.downloads()] == ["126002", "126004"]
    assert len(storage.gets()) == 2
    finals = [e for e in events if e.finished]
    assert [(e.model, e.bytes_done, e.bytes_total) for e in finals] == [
        (BASE, len(base_bytes), len(base_bytes)),
        (REFINER, len(refiner_bytes), len(refiner_bytes)),
    ]
    assert all(e.rate_bps >= 0 for e in events)

    # Later requests, and a restarted server with downloads turned off, find both in the cache.
    requests_before = len(civitai.requests) + len(storage.requests)
    assert store.resolve(BASE) == base
    restarted = make_store(offline=True)
    assert restarted.resolve(BASE).path == base.path
    assert restarted.resolve(REFINER).path.read_bytes() == refiner_bytes
    assert len(civitai.requests) + len(storage.requests) == requests_before


def test_token_goes_to_the_api_host_only(make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage) -> None:
    add_sdxl_pair(civitai)
    civitai.require_auth.add(128078)
    make_store().resolve(BASE)

    (download,) = civitai.downloads()
    assert download.headers["authorization"] == f"Bearer {CIVITAI_TOKEN}"
    assert "token" not in download.query
    assert storage.gets() and all("authorization" not in r.headers for r in storage.requests)


def test_a_creator_that_requires_login_needs_the_token(make_store: MakeStore, civitai: FakeCivitai) -> None:
    add_sdxl_pair(civitai)
    civitai.require_auth.add(128078)
    with pytest.raises(SourceUnauthenticated) as caught:
        make_store(civitai_token=None).resolve(BASE)
    assert "CIVITAI_TOKEN" in str(caught.value)
    assert "requires you to be logged in" in str(caught.value)  # civitai's own words reach the user


@pytest.mark.parametrize(
    ("status", "body", "error", "words"),
    [
        (
            401,
            {"error": "Unauthorized", "message": "The creator has disabled downloads"},
            SourceUnauthenticated,
            "disabled downloads",
        ),
        (
            403,
            {"error": "Early Access", "message": "This asset is in Early Access"},
            SourcePermissionDenied,
            "Early Access",
        ),
        (404, {"error": "File not found"}, ModelNotFound, "File not found"),
        (410, {"error": "Model archived, not available for download"}, ModelNotFound, "archived"),
        (
            429,
            {"error": "We've noticed an unusual amount of downloading"},
            SourceRateLimited,
            "unusual amount",
        ),
        (500, {"error": "Error getting file"}, SourceUnavailable, "Error getting file"),
    ],
)
def test_download_errors_carry_the_servers_message(
    make_store: MakeStore,
    civitai: FakeCivitai,
    cache_dir: Path,
    status: int,
    body: dict[str, str],
    error: type[ModelStoreError],
    words: str,
) -> None:
    add_sdxl_pair(civitai)
    civitai.download_errors[128078] = (status, body, {"Retry-After": "30"})
    store = make_store()
    with pytest.raises(error) as caught:
        store.resolve(BASE)
    assert words in str(caught.value)
    if status == 429:
        assert isinstance(caught.value, SourceRateLimited) and caught.value.retry_after_s == 30
    # The JSON error body was never saved as a model.
    assert store.lookup(BASE) is None and blob_files(cache_dir) == [] and partial_files(cache_dir) == []


def test_unknown_version_and_wrong_model_id(make_store: MakeStore, civitai: FakeCivitai) -> None:
    add_sdxl_pair(civitai)
    store = make_store()
    with pytest.raises(ModelNotFound, match="Model not found"):
        store.resolve("civitai:101055@999999")
    with pytest.raises(ModelNotFound, match="belongs to model 101055"):
        store.resolve("civitai:4242@128078")
    assert civitai.downloads() == []


def test_a_pinned_file_id_is_downloaded(make_store: MakeStore, civitai: FakeCivitai) -> None:
    full, pruned = payloads.checkpoint("base", seed=10), payloads.checkpoint("base", seed=11)
    civitai.add_version(
        7,
        70,
        [
            (FakeFile(701, "full.safetensors", size="full", fp="fp32"), full),
            (FakeFile(702, "pruned.safetensors"), pruned),
        ],
    )
    store = make_store()
    assert store.resolve("civitai:7@70").path.read_bytes() == pruned  # the default preference: pruned fp16
    assert store.resolve("civitai:7@70+701").path.read_bytes() == full


def test_pinning_a_vae_or_a_pickle_is_refused_before_downloading(make_store: MakeStore, civitai: FakeCivitai) -> None:
    civitai.add_version(
        7,
        70,
        [
            (FakeFile(701, "vae.safetensors", type="VAE"), payloads.checkpoint(seed=1)),
            (FakeFile(702, "model.ckpt", format="PickleTensor"), payloads.pickle_checkpoint()),
        ],
    )
    store = make_store()
    with pytest.raises(WrongArchitecture, match="VAE"):
        store.resolve("civitai:7@70+701")
    with pytest.raises(UnsafeCheckpoint, match="PickleTensor"):
        store.resolve("civitai:7@70+702")
    with pytest.raises(UnsafeCheckpoint, match="only as PickleTensor"):
        store.resolve("civitai:7@70")
    assert civitai.downloads() == []


@pytest.mark.parametrize("model_type", ["VAE", "TextualInversion", "Controlnet"])
def test_only_checkpoints_and_loras_are_kept(make_store: MakeStore, civitai: FakeCivitai, model_type: str) -> None:
    # LoRAs are the store's too (tests/modelstore/test_loras.py); every other type is refused before a download.
    civitai.add_version(9, 90, [(FakeFile(901, "x.safetensors"), payloads.checkpoint())], model_type=model_type)
    with pytest.raises(WrongArchitecture, match=f"is a {model_type}, not a checkpoint or a LoRA"):
        make_store().resolve("civitai:9@90")
    assert civitai.downloads() == []


def _version(files: list[dict[str, object]]) -> dict[str, object]:
    return {"id": 2, "modelId": 1, "files": files}


def _file(file_id: int, file_type: str, fmt: str, size: str, fp: str) -> dict[str, object]:
    return {"id": file_id, "type": file_type, "metadata": {"format": fmt, "size": size, "fp": fp}}


@pytest.mark.parametrize(
    ("files", "chosen"),
    [
        # pruned beats full, fp16 beats fp32, a VAE or a pickle is never chosen, whatever `primary` says
        (
            [
                _file(1, "VAE", "SafeTensor", "pruned", "fp16"),
                _file(2, "Model", "SafeTensor", "full", "fp32"),
            ],
            2,
        ),
        (
            [
                _file(3, "Model", "SafeTensor", "full", "fp16"),
                _file(4, "Pruned Model", "SafeTensor", "pruned", "fp16"),
            ],
            4,
        ),
        (
            [
                _file(5, "Model", "PickleTensor", "pruned", "fp16"),
                _file(6, "Model", "SafeTensor", "full", "fp32"),
            ],
            6,
        ),
        (
            [
                _file(8, "Model", "SafeTensor", "pruned", "fp32"),
                _file(7, "Model", "SafeTensor", "pruned", "fp16"),
            ],
            7,
        ),
        (
            [
                _file(9, "Model", "SafeTensor", "pruned", "fp16"),
                _file(8, "Model", "SafeTensor", "pruned", "fp16"),
            ],
            8,
        ),
    ],
)
def test_file_choice_is_deterministic(files: list[dict[str, object]], chosen: int) -> None:
    air = parse_air("civitai:1@2")
    assert choose_file(_version(files), air)["id"] == chosen
    assert choose_file(_version(list(reversed(files))), air)["id"] == chosen


def test_an_expired_link_is_replaced_and_the_download_resumes(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    data = payloads.checkpoint("refiner", seed=5)
    civitai.add_version(101055, 128080, [(FakeFile(126004, "refiner.safetensors"), data)])
    obj = civitai.object_of(128080, 126004)
    obj.cut_at, obj.cut_times = len(data) // 2, 1  # the connection drops half-way ...
    storage.sign_uses = 1  # ... and each presigned link works once: the retry finds it expired

    record = make_store().resolve(REFINER)

    assert record.path.read_bytes() == data
    assert len(civitai.downloads()) == 2  # asked civitai again for a fresh link
    gets = storage.gets()
    assert gets[-1].headers["range"] == f"bytes={len(data) // 2}-"  # and continued where it was
    assert gets[-1].query["X-Amz-Signature"] != gets[0].query["X-Amz-Signature"]


def test_a_dropped_connection_resumes_with_range(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    data = payloads.checkpoint("base", seed=6)
    civitai.add_version(101055, 128078, [(FakeFile(126002, "base.safetensors"), data)])
    obj = civitai.object_of(128078, 126002)
    obj.cut_at, obj.cut_times = 1_000_000, 2

    assert make_store().resolve(BASE).path.read_bytes() == data
    assert [r.headers.get("range") for r in storage.gets()] == [None, "bytes=1000000-", "bytes=1000000-"]


def test_a_wrong_hash_leaves_nothing_in_the_cache(make_store: MakeStore, civitai: FakeCivitai, cache_dir: Path) -> None:
    civitai.add_version(1, 2, [(FakeFile(3, "m.safetensors", sha256="ab" * 32), payloads.checkpoint(seed=7))])
    store = make_store()
    with pytest.raises(IntegrityError, match="SHA256 mismatch"):
        store.resolve("civitai:1@2")
    assert store.lookup("civitai:1@2") is None and store.list_models() == []
    assert blob_files(cache_dir) == [] and partial_files(cache_dir) == []


def test_a_body_shorter_than_published_is_refused(make_store: MakeStore, civitai: FakeCivitai, cache_dir: Path) -> None:
    data = payloads.checkpoint(seed=8, extra_bytes=200_000)
    civitai.add_version(1, 2, [(FakeFile(3, "m.safetensors"), data)])
    civitai.object_of(2, 3).data = data[:100_000]  # storage holds a truncated upload
    store = make_store()
    with pytest.raises(IntegrityError, match="published about"):
        store.resolve("civitai:1@2")
    assert store.lookup("civitai:1@2") is None and blob_files(cache_dir) == []


def test_a_link_that_keeps_dropping_fails_and_the_next_pull_resumes(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, cache_dir: Path
) -> None:
    data = payloads.checkpoint(seed=9, extra_bytes=300_000)
    civitai.add_version(1, 2, [(FakeFile(3, "m.safetensors"), data)])
    obj = civitai.object_of(2, 3)
    obj.cut_at = 120_000  # every attempt stops at the same byte
    store = make_store()
    with pytest.raises(SourceUnavailable, match="next attempt resumes"):
        store.resolve("civitai:1@2")
    assert store.lookup("civitai:1@2") is None and blob_files(cache_dir) == []
    (partial,) = partial_files(cache_dir)
    assert partial.stat().st_size == 120_000

    obj.cut_at = None  # the link recovers
    assert store.resolve("civitai:1@2").path.read_bytes() == data
    assert storage.gets()[-1].headers["range"] == "bytes=120000-"
    assert partial_files(cache_dir) == []


def test_a_slow_body_reports_progress_as_it_goes(make_store: MakeStore, civitai: FakeCivitai) -> None:
    data = payloads.checkpoint(seed=12, extra_bytes=1_000_000)
    civitai.add_version(1, 2, [(FakeFile(3, "m.safetensors"), data)])
    civitai.object_of(2, 3).trickle_s = 0.05  # 16 chunks in ~0.8 s: about eight reports (one per 0.1 s at most)
    events: list[DownloadProgress] = []
    make_store().resolve("civitai:1@2", progress=events.append)
    done = [e.bytes_done for e in events]
    assert len(set(done)) > 3 and done == sorted(done) and done[-1] == len(data)
    assert events[-1].finished and events[-1].bytes_total == len(data)


def test_hostile_file_names_are_metadata_only(make_store: MakeStore, civitai: FakeCivitai, tmp_path: Path) -> None:
    hostile = "../../evil.safetensors"
    data = payloads.checkpoint(seed=13)
    civitai.add_version(1, 2, [(FakeFile(3, hostile), data)])  # in files[].name and Content-Disposition
    record = make_store().resolve("civitai:1@2")
    assert record.path.name == "model.safetensors" and (tmp_path / "cache") in record.path.parents
    assert list(tmp_path.parent.rglob("evil*")) == []


@pytest.mark.parametrize("payload", [payloads.pickle_checkpoint(), payloads.torch_zip_checkpoint()])
def test_a_pickle_served_as_safetensor_is_refused(
    make_store: MakeStore, civitai: FakeCivitai, cache_dir: Path, payload: bytes
) -> None:
    # The metadata says SafeTensor and the hash matches: only the content gives it away.
    civitai.add_version(1, 2, [(FakeFile(3, "model.safetensors"), payload)])
    store = make_store()
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        store.resolve("civitai:1@2")
    assert store.lookup("civitai:1@2") is None and store.list_models() == []
    assert blob_files(cache_dir) == [] and partial_files(cache_dir) == []


def test_tokens_and_presigned_urls_never_reach_logs_or_errors(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    add_sdxl_pair(civitai)
    # A careless server that echoes the credentials it got back in its error message.
    civitai.download_errors[128080] = (403, {"error": f"Forbidden for Bearer {CIVITAI_TOKEN}"}, {})
    obj = civitai.object_of(128078, 126002)
    obj.cut_at, obj.cut_times = 100_000, 1
    storage.sign_uses = 1  # expired links and retries get logged
    store = make_store()

    store.resolve(BASE)
    with pytest.raises(SourcePermissionDenied) as caught:
        store.resolve(REFINER)

    signatures = [r.query["X-Amz-Signature"] for r in storage.gets()]
    texts = [caplog.text, str(caught.value), repr(caught.value), repr(store.settings)]
    for secret in [CIVITAI_TOKEN, *signatures]:
        assert all(secret not in text for text in texts)
    assert "storage refused the download link" in caplog.text  # the retry was logged, without its URL


class RecordingSession(requests.Session):
    """A session a caller hands the store: it sees every request the store makes."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append(urlsplit(request.url or "").path)
        return super().send(request, **kwargs)


def test_the_store_talks_http_through_the_session_it_is_given(
    make_store: MakeStore, civitai: FakeCivitai, storage: FakeStorage
) -> None:
    add_sdxl_pair(civitai)
    session = RecordingSession()
    store = make_store(session=session)

    store.resolve(BASE)
    store.close()

    assert session.sent == ["/api/v1/model-versions/128078", "/api/download/models/128078", "/bucket/128078-126002"]
    assert len(storage.gets()) == 1
    session.get(f"{civitai.url}/api/v1/model-versions/128078").close()  # still open: it is the caller's


def test_a_netrc_entry_for_the_hosts_changes_no_credentials(
    make_store: MakeStore,
    civitai: FakeCivitai,
    storage: FakeStorage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # requests would send ~/.netrc's login as Basic auth in place of the token, and to storage too.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-password-0123456789\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    add_sdxl_pair(civitai)

    make_store().resolve(BASE)

    (download,) = civitai.downloads()
    assert download.headers["authorization"] == f"Bearer {CIVITAI_TOKEN}"
    assert storage.gets() and all("authorization" not in r.headers for r in storage.requests)
