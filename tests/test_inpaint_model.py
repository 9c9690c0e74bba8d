"""An SDXL inpainting base serves only requests that bring an image and a mask (issue 18): any other request
naming one is refused with FAILED_PRECONDITION naming `model`, as soon as the model's record is known and before
any step runs. A standard base serves every mode (it inpaints by blending the masked latent)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modelstore import DownloadCause, ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from server.api.validation import job_from_request
from server.core.domain import ImageMode, Job, SeedImage, StoredImage
from server.core.errors import DoesNotFit
from server.core.settings import DEFAULT_PAIR, Limits
from server.scheduling.leases import LeaseSet
from server.scheduling.resolver import Resolver
from tests.integration.conftest import TIMEOUT_S, ServerThread, bad_request_fields, make_settings, new_stub

TINY_INPAINT = "builtin:tiny-sdxl-inpaint@1"
TINY_BASE = "builtin:tiny-sdxl-base@1"
NEEDS_MASK = f"{TINY_INPAINT} is an SDXL inpainting model: it needs image and mask"


def _stored(name: str) -> StoredImage:
    return StoredImage(f"sha256:{name * 64}", Path("/nonexistent"), 64, 64, "image/png")


def _job(model: str, mode: ImageMode, *, refiner: bool = False) -> Job:
    request = pb.GenerateRequest(positive_prompt="a red door", model=model, refiner=pb.Refiner() if refiner else None)
    job = job_from_request(
        request, limits=Limits(), default_model=DEFAULT_PAIR.base, default_refiner=DEFAULT_PAIR.refiner
    )
    if mode is ImageMode.TEXT:
        return job
    mask = _stored("b") if mode is ImageMode.INPAINT else None
    return dataclasses.replace(job, seed_image=SeedImage(_stored("a"), mask))


def _resolve(store: ModelStore, job: Job) -> None:
    """What the scheduler does with a queued request before it can run: its models, then its LoRAs."""
    resolver, leases = Resolver(store), LeaseSet(store)
    cause = DownloadCause.request(job.request_id)
    try:
        resolver.loras(job, resolver.pair_spec(job.pair, leases, cause=cause), leases, cause=cause)
    finally:
        leases.release_all()


@pytest.mark.parametrize("mode", [ImageMode.TEXT, ImageMode.IMG2IMG], ids=["text-to-image", "img2img"])
@pytest.mark.parametrize("refiner", [False, True], ids=["base-only", "with-refiner"])
def test_an_inpainting_base_without_a_mask_does_not_fit_the_request(
    model_store: ModelStore, mode: ImageMode, refiner: bool
) -> None:
    with pytest.raises(DoesNotFit, match=NEEDS_MASK) as refused:
        _resolve(model_store, _job(TINY_INPAINT, mode, refiner=refiner))
    assert refused.value.field == "model"


def test_an_inpainting_base_with_a_mask_resolves_and_a_standard_base_takes_every_mode(
    model_store: ModelStore,
) -> None:
    _resolve(model_store, _job(TINY_INPAINT, ImageMode.INPAINT, refiner=True))
    for mode in ImageMode:
        _resolve(model_store, _job(TINY_BASE, mode, refiner=True))


@pytest.fixture(scope="module")
def server(store_settings: StoreSettings, model_store: ModelStore) -> Iterator[ServerThread]:
    # Nothing pinned: the refusal must come before any model is loaded on the device.
    thread = ServerThread(make_settings(store_settings, pins=()), store=model_store)
    try:
        thread.wait_ready()
        yield thread
    finally:
        thread.close()


def test_a_text_to_image_request_on_an_inpainting_base_is_failed_precondition_naming_model(
    server: ServerThread,
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stream = new_stub(channel).Generate(
            pb.GenerateRequest(positive_prompt="a red door", model=TINY_INPAINT), timeout=TIMEOUT_S
        )
        seen: list[str] = []
        with pytest.raises(grpc.RpcError) as raised:
            seen.extend(str(r.WhichOneof("event")) for r in stream)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert bad_request_fields(raised.value) == ["model"]
    assert NEEDS_MASK in str(raised.value.details())
    assert "progress" not in seen and "image" not in seen  # refused before any step ran
