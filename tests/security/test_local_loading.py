"""Issue 21, items 5 and 6, at load time, and the CLI's own files: a local model is loaded from the files that
were checked, never from its names again; `refinery generate` runs a Hugging Face cache snapshot it was given
(its files are links into `../../blobs/`), while a server's roots keep refusing links out of them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelstore import ModelStore, Role, StoreSettings, load_pipeline
from modelstore.errors import ModelNotFound, ModelStoreError
from server.api.local_models import canonical
from server.cli.serve import local_roots_of_the_caller
from tests.fixtures.tiny import TINY_BASE, another_base
from tests.integration.test_cli import refinery

from .conftest import TIMEOUT_S

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture
def confined(store_settings: StoreSettings, tmp_path: Path) -> Iterator[ModelStore]:
    """A store of its own (the shared one must not gain roots) confined to `tmp_path/allowed`."""
    store = ModelStore(store_settings)
    (tmp_path / "allowed").mkdir()
    store.confine_local([tmp_path / "allowed"])
    yield store
    forget_under(store, tmp_path)
    store.close()


def forget_under(store: ModelStore, folder: Path) -> None:
    """Forget the local models under `folder` (the cache is shared: other tests list it)."""
    for model in store.list_models():
        if model.source == "local" and folder in model.path.parents:
            store.delete(model.air)


def test_a_name_swapped_during_loads_never_loads_the_outside_file(
    confined: ModelStore, model_store: ModelStore, tmp_path: Path
) -> None:
    folder = Path(another_base(model_store, tmp_path / "allowed").removeprefix("local:"))
    inside = load_file(folder / UNET)["conv_in.weight"]
    # Outside the roots: a valid UNet with other weights (the tiny base's own), which a load must never use.
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(model_store.resolve(TINY_BASE).path / UNET, outside)
    assert not torch.equal(load_file(outside)["conv_in.weight"], inside)
    record = confined.resolve(f"local:{folder}")
    shared = load_pipeline(model_store.resolve(TINY_BASE), role=Role.BASE, device="cpu").components
    reuse = {k: v for k, v in shared.items() if k != "unet" and v is not None}  # only the UNet is read again

    name, keep, spare = folder / UNET, tmp_path / "allowed" / "keep", folder / "unet" / ".spare"
    os.link(name, keep)  # the checked inode, to put back under its name
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            spare.unlink(missing_ok=True)
            os.link(keep, spare)
            os.replace(spare, name)
            spare.unlink(missing_ok=True)
            spare.symlink_to(outside)
            os.replace(spare, name)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    loaded, refused, leaked = 0, 0, 0
    deadline = time.monotonic() + 10
    try:
        for _ in range(200):
            if time.monotonic() > deadline:
                break
            try:
                pipe = load_pipeline(record, role=Role.BASE, device="cpu", components=reuse)
            except ModelStoreError:
                refused += 1
                continue
            loaded += 1
            leaked += not torch.equal(pipe.unet.conv_in.weight.detach(), inside)
    finally:
        stop.set()
        swapper.join(TIMEOUT_S)
    assert leaked == 0, f"{leaked} of {loaded} loads read the file outside the roots"
    assert loaded >= 1 and loaded + refused >= 5, (loaded, refused)


def hf_snapshot(folder: Path, hub: Path) -> Path:
    """`folder` laid out as the Hugging Face cache lays out a download: each file a relative link from
    `snapshots/<rev>/` into `blobs/<sha256>`."""
    repo = hub / "models--someone--tiny-base"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_the_caller_may_name_a_hugging_face_snapshot_but_a_server_root_refuses_its_links(
    model_store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = hf_snapshot(Path(another_base(model_store, tmp_path).removeprefix("local:")), tmp_path / "hub")
    blobs = snapshot.parents[1] / "blobs"
    # `refinery serve --local-models .../snapshots`: the links lead out of the root, refused as before.
    assert canonical(f"local:{snapshot}", (snapshot.parent,)) is None
    # `refinery generate --model <snapshot>`: the folder the links lead into is the caller's too, and only it.
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    roots = local_roots_of_the_caller([str(snapshot)])
    assert roots == (work, snapshot.parent, blobs)
    assert canonical(f"local:{snapshot}", roots) == f"local:{snapshot}"


@pytest.mark.skipif(sys.platform != "linux", reason="local models are opened through /proc/self/fd")
def test_refinery_generate_runs_a_hugging_face_snapshot(
    model_store: ModelStore, store_settings: StoreSettings, tmp_path: Path
) -> None:
    snapshot = hf_snapshot(Path(another_base(model_store, tmp_path).removeprefix("local:")), tmp_path / "hub")
    work = tmp_path / "work"
    work.mkdir()
    result = refinery(
        "generate", "a lighthouse", "--model", str(snapshot), "--steps", "2", "-o", "out.png",
        cache=store_settings.cache_dir, cwd=work,
    )  # fmt: skip
    forget_under(model_store, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (work / "out.png").is_file()
    assert f"local:{snapshot}" in result.stdout


def test_a_folder_check_names_the_models_path_not_the_view(confined: ModelStore, tmp_path: Path) -> None:
    folder = tmp_path / "allowed" / "no-unet"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ModelNotFound) as refused:
        confined.resolve(f"local:{folder}")
    assert str(folder) in str(refused.value)
    assert "refinery-local-" not in str(refused.value)
