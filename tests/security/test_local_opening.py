"""Issue 21, items 5, 6, 8 and the bidi part of 10: a local model is opened as it was checked.

A link inside an allowed folder that leads out of the roots is refused like any other hostile path; a name
swapped between a file and a link while requests run never makes the server read the file outside; one real
file under many spellings is one model; an unresolvable path (`/proc/1/root/...`) gets the same refusal as
every other; and a model's name reaches the plain log with its invisible characters escaped.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.core.settings import Security
from tests.fixtures.tiny import another_base
from tests.integration.conftest import ServerThread, make_settings

from .conftest import TIMEOUT_S, Answer, ServeProcess, answer_of, wait_until
from .test_local_models import listed

# What the outside file says about itself if anything reads it: a "JSON or HTML document" by its first bytes.
OUTSIDE_BYTES = b'{"secret": "outside the roots"}' + b" " * 64
# What the in-root file is: a pickle, refused by its content (a different message).
INSIDE_BYTES = b"\x80\x04" + b"\x00" * 94


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, model_store: ModelStore) -> dict[str, Path]:
    top = tmp_path_factory.mktemp("opening")
    allowed, outside = top / "allowed", top / "outside"
    allowed.mkdir()
    outside.mkdir()
    good = Path(another_base(model_store, allowed).removeprefix("local:"))
    # A copy of the good folder whose UNet weights are a link to a valid checkpoint outside the roots.
    linked = allowed / "linked-weights"
    shutil.copytree(good, linked)
    stolen = outside / "unet.safetensors"
    shutil.copyfile(good / "unet" / "diffusion_pytorch_model.safetensors", stolen)
    (linked / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (linked / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(stolen)
    (outside / "secret.safetensors").write_bytes(OUTSIDE_BYTES)
    return {"allowed": allowed, "outside": outside, "good": good, "linked": linked}


@pytest.fixture(scope="module")
def server(store_settings: StoreSettings, places: dict[str, Path]) -> Iterator[str]:
    """A server whose store is its own, as in production: the session's shared store is confined by every test
    server's roots together (the temp folder, for most), which would let the outside folder in."""
    store = ModelStore(store_settings)
    security = Security(local_model_roots=(places["allowed"],))
    thread = ServerThread(make_settings(store_settings, pins=(), security=security), store=store)
    try:
        yield thread.address
    finally:
        thread.close()
        store.close()


def generate(address: str, model: str) -> Answer:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.GenerateRequest(positive_prompt="a cat", model=model, steps=2)
        return answer_of(functools.partial(stub.Generate, request, timeout=TIMEOUT_S))


def images(address: str, model: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.GenerateRequest(positive_prompt="a cat", model=model, steps=2, width=64, height=64)
        return [r.image.model for r in stub.Generate(request, timeout=TIMEOUT_S) if r.WhichOneof("event") == "image"]


def test_a_link_out_of_the_roots_inside_an_allowed_folder_is_refused_like_any_path(
    server: str, places: dict[str, Path]
) -> None:
    refused = generate(server, "/dev/null")
    assert refused.code is grpc.StatusCode.INVALID_ARGUMENT
    assert generate(server, f"local:{places['linked']}") == refused
    assert not any("linked-weights" in model or "outside" in model for model in listed(server))


def test_unresolvable_paths_get_the_same_refusal(server: str, places: dict[str, Path]) -> None:
    refused = generate(server, "/dev/null")
    for path in ("/proc/1/root/etc/passwd", f"/proc/1/root{places['good']}", "/proc/1/cwd/x.safetensors"):
        assert generate(server, path) == refused, path


def test_one_real_folder_under_many_spellings_is_one_model(server: str, places: dict[str, Path]) -> None:
    good = places["good"]
    spellings = [
        f"local:{good}",
        f"local:/proc/self/root{good}",
        f"local:/proc/{os.getpid()}/root{good}",
        f"local:/proc/thread-self/root{good}",
        f"local:/./{str(good).lstrip('/')}",
        f"local:{good.parent}/./{good.name}",
    ]
    for spelling in spellings:
        assert images(server, spelling) == [f"local:{good}"], spelling
    # Every entry for this one real folder, whatever its spelling (other tests' folders share its name).
    mine = [m for m in listed(server) if m.startswith("local:") and os.path.realpath(m[6:]) == os.path.realpath(good)]
    assert mine == [f"local:{good}"]


def test_a_name_swapped_between_a_file_and_a_link_never_reads_the_outside_file(
    server: str, places: dict[str, Path]
) -> None:
    name = places["allowed"] / "swapping.safetensors"
    secret = places["outside"] / "secret.safetensors"
    stop = threading.Event()

    def swap() -> None:
        spare = places["allowed"] / ".swapping.tmp"
        while not stop.is_set():
            spare.unlink(missing_ok=True)
            spare.write_bytes(INSIDE_BYTES)
            os.replace(spare, name)
            spare.unlink(missing_ok=True)
            spare.symlink_to(secret)
            os.replace(spare, name)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    answers: list[Answer] = []
    deadline = time.monotonic() + 10
    try:
        while len(answers) < 200 and time.monotonic() < deadline:
            answers.append(generate(server, str(name)))
    finally:
        stop.set()
        swapper.join(TIMEOUT_S)
    leaked = [a.details for a in answers if "JSON" in a.details or "secret" in a.details]
    assert not leaked, f"{len(leaked)} of {len(answers)} answers read the outside file: {leaked[0]}"
    assert len(answers) >= 20
    assert not any("secret" in model for model in listed(server))


@pytest.mark.parametrize("mark", ["\u202e", "\u2066", "\u200f"])
def test_invisible_characters_in_a_model_name_are_escaped_in_the_plain_log(
    mark: str, serve_process: Callable[..., ServeProcess], places: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "models"
    folder = root / f"evil{mark}gnp.safetensors"
    shutil.copytree(places["good"], folder)
    server = serve_process("--pin", "none", "--drain-delay", "0", "--devices", "cpu", "--local-models", str(root))
    assert images(server.address, f"local:{folder}") == [f"local:{folder}"]
    wait_until(lambda: "registered local model" in server.log, "the model is registered")
    assert mark not in server.log
    assert f"evil{mark!r}"[5:-1] in server.log or repr(mark)[1:-1] in server.log
