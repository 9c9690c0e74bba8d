"""Cold start in one pass (issue 19): a cached model's weight files are read once, by the load, and that read
is their check. As strict as before: a file that fails is set aside and fetched again, or the model refused,
and nothing built from it is ever handed out.

The stores here are the server's kind (`check_weights_when_loaded`), each a new process as far as the cache can
tell (nothing checked yet), over a copy of the session's cache holding the tiny built-in pair.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from modelstore import DownloadProgress, ModelRecord, ModelStore, Role, StoreSettings, load_pipeline
from modelstore import components as components_module
from modelstore._safetensors_header import read_header
from modelstore.errors import ReadOnlyCache
from modelstore.units import format_bytes
from tests.conftest import TINY_BASE
from tests.integration.test_damaged_models import copy_cache, flip_byte_at, in_the_unet

UNET = "unet/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
TEXT_ENCODER_2 = "text_encoder_2/model.safetensors"
CPU, FP32 = "cpu", torch.float32
READ_ONCE = re.compile(r"weights read once: ([0-9.]+ \w+), ([0-9.]+ \w+) of it checked")


@pytest.fixture
def cache(tmp_path: Path, store_settings: StoreSettings, model_store: ModelStore) -> Path:
    model_store.resolve(TINY_BASE)  # built into the session's cache (once), then copied
    return copy_cache(store_settings.cache_dir, tmp_path / "cache")


def one_pass_store(cache: Path, **settings: object) -> ModelStore:
    return ModelStore(StoreSettings(cache_dir=cache, **settings), check_weights_when_loaded=True)  # type: ignore[arg-type]


def weight_bytes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*.safetensors"))}


def blob(record: ModelRecord, relative: str) -> Path:
    return (record.path / relative).resolve()


def read_once(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(bytes read, bytes checked) from each load's log line."""
    return [(m[1], m[2]) for r in caplog.records if (m := READ_ONCE.search(r.getMessage()))]


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    mine, theirs = tensors(a), tensors(b)
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_resolve_leaves_the_weights_to_the_load_which_reads_each_file_once_and_checks_it(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelstore.loading")
    store = one_pass_store(cache)
    heard: list[DownloadProgress] = []
    record = store.resolve(TINY_BASE, progress=heard.append)
    weights = weight_bytes(record.path)
    blobs = {p.resolve() for p in record.path.rglob("*") if p.is_file()}  # the tokenizers share their files
    everything = sum(b.stat().st_size for b in blobs)

    load_pipeline(record, role=Role.BASE, device=CPU, dtype=FP32)
    load_pipeline(record, role=Role.BASE, device=CPU, dtype=FP32)  # checked once per process, as before
    store.close()

    # Resolving checked the configs and tokenizers only; not one weight byte was read for it.
    assert max(p.bytes_total for p in heard) == everything - sum(weights.values())
    total = format_bytes(sum(weights.values()))
    assert read_once(caplog) == [(total, total), (total, "0 B")]


def test_a_flipped_byte_in_the_unet_is_caught_by_its_load_set_aside_and_rebuilt(
    cache: Path, model_store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = one_pass_store(cache)
    record = store.resolve(TINY_BASE)
    damaged = blob(record, UNET)
    flip_byte_at(damaged, in_the_unet(damaged))
    caplog.set_level(logging.WARNING)

    pipe = load_pipeline(record, role=Role.BASE, device=CPU, dtype=FP32)
    store.close()

    clean = load_pipeline(model_store.resolve(TINY_BASE), role=Role.BASE, device=CPU, dtype=FP32)
    assert same_weights(pipe.unet, clean.unet)  # the rebuilt file's weights, never the flipped one's
    assert f"{TINY_BASE}: {UNET} changed since it entered the cache" in caplog.text
    assert "fetching it again" in caplog.text
    assert (cache / "quarantine" / damaged.name).is_file()


def test_a_damaged_header_reads_as_damage_not_as_a_malformed_model(cache: Path) -> None:
    store = one_pass_store(cache)
    record = store.resolve(TINY_BASE)
    damaged = blob(record, UNET)
    flip_byte_at(damaged, 9)  # the header's opening brace: the file no longer parses as safetensors

    pipe = load_pipeline(record, role=Role.BASE, device=CPU, dtype=FP32)
    store.close()

    assert pipe.unet is not None
    assert (cache / "quarantine" / damaged.name).is_file()


def test_a_weight_file_the_load_does_not_need_is_still_checked(cache: Path, model_store: ModelStore) -> None:
    shared_vae = load_pipeline(model_store.resolve(TINY_BASE), role=Role.BASE, device=CPU, dtype=FP32).vae
    store = one_pass_store(cache)
    record = store.resolve(TINY_BASE)
    damaged = blob(record, VAE)
    header = read_header(damaged)
    flip_byte_at(damaged, header.data_offset + 3)

    load_pipeline(record, role=Role.BASE, device=CPU, dtype=FP32, components={"vae": shared_vae})
    store.close()

    assert (cache / "quarantine" / damaged.name).is_file()


def test_where_it_cannot_be_fetched_again_the_load_fails_after_building_and_hands_out_nothing(cache: Path) -> None:
    writable = one_pass_store(cache)
    damaged = blob(writable.resolve(TINY_BASE), TEXT_ENCODER_2)  # the last weight file the load reads
    writable.close()
    flip_byte_at(damaged, read_header(damaged).data_offset + 5)
    store = one_pass_store(cache, read_only=True)
    record = store.resolve(TINY_BASE)

    with pytest.raises(ReadOnlyCache, match=f"{TEXT_ENCODER_2} changed since it entered the cache"):
        load_pipeline(record, role=Role.BASE, device=CPU, dtype=FP32)
    store.close()


def test_measuring_a_model_first_makes_the_checks_its_load_would(
    cache: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As after a model enters the cache: its components not measured yet, neither in the cache's memos nor in
    # this process's (an earlier test of the session may have measured the tiny base).
    for memo in (cache / "components").glob("*.json"):
        memo.unlink()
    monkeypatch.setattr(components_module, "_memo", {})
    caplog.set_level(logging.INFO, logger="modelstore.loading")
    store = one_pass_store(cache)
    record = store.resolve(TINY_BASE)
    damaged = blob(record, UNET)
    flip_byte_at(damaged, in_the_unet(damaged))

    components = store.components(record)  # reads the weights: their checks come first
    load_pipeline(record, role=Role.BASE, device=CPU, dtype=FP32)
    store.close()

    assert {c.name for c in components} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert (cache / "quarantine" / damaged.name).is_file()
    ((_, checked),) = read_once(caplog)
    assert checked == "0 B"  # nothing left for the load to check
