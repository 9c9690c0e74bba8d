"""Issue 18 through a real server: img2img, refine-only and inpainting (4- and 9-channel bases) equal diffusers
run by hand with its img2img / inpaint pipelines and `strength`, `denoising_end` / `denoising_start` at the same
split, for every sampler; the stream counts the steps that run; the mask survives the hand-off."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import grpc
import numpy
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.api.validation import SAMPLERS
from server.core.settings import Speed
from server.generation.samplers import make_scheduler
from server.scheduling.devices import cpu_threads

from .conftest import ServerThread, collect, events, make_settings, new_stub

TINY_BASE = "builtin:tiny-sdxl-base@1"
TINY_REFINER = "builtin:tiny-sdxl-refiner@1"
TINY_INPAINT = "builtin:tiny-sdxl-inpaint@1"
PROMPT = "a lighthouse on a cliff at dusk"
ALL_SAMPLERS: list[int] = [
    pb.SCHEDULER_EULER,
    pb.SCHEDULER_EULER_ANCESTRAL,
    pb.SCHEDULER_DDIM,
    pb.SCHEDULER_DPMPP_2M,
    pb.SCHEDULER_DPMPP_2M_KARRAS,
    pb.SCHEDULER_UNIPC,
]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def seed_image() -> Image.Image:
    rng = numpy.random.default_rng(18)
    gradient = numpy.linspace(0, 255, 64, dtype=numpy.float32)
    base = numpy.stack([numpy.add.outer(gradient, gradient) / 2] * 3, axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(numpy.clip(noisy, 0, 255).astype(numpy.uint8), "RGB")


def mask_image() -> Image.Image:
    mask = numpy.zeros((64, 64), dtype=numpy.uint8)
    mask[16:48, 24:56] = 255
    return Image.fromarray(mask, "L").convert("RGB")  # as a user's paint program saves it


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def rgb(image: Image.Image) -> numpy.ndarray:
    return numpy.asarray(image.convert("RGB"), dtype=numpy.int16)


def request(**fields: Any) -> pb.GenerateRequest:
    fields.setdefault("model", TINY_BASE)
    fields.setdefault("positive_prompt", PROMPT)
    fields.setdefault("seed", 1234)
    fields.setdefault("cfg_scale", 7.0)
    fields.setdefault("image", pb.ImageInput(data=png(seed_image())))
    return pb.GenerateRequest(**fields)


@dataclass(frozen=True)
class Split:
    """What a request asks for, as the hand-run needs it."""

    steps: int
    strength: float
    base_steps: int | None  # grid steps before the hand-off; None: no refiner
    sampler: int = pb.SCHEDULER_EULER
    seed: int = 1234


class ByHand:
    """diffusers' own SDXL img2img / inpaint pipelines over the tiny models' folders, called as its docs show."""

    def __init__(self, model_store: ModelStore) -> None:
        common: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True, "use_safetensors": True}
        folder = {name: str(model_store.resolve(name).path) for name in (TINY_BASE, TINY_REFINER, TINY_INPAINT)}
        self.loaded = {
            TINY_BASE: StableDiffusionXLPipeline.from_pretrained(folder[TINY_BASE], **common),
            TINY_INPAINT: StableDiffusionXLInpaintPipeline.from_pretrained(folder[TINY_INPAINT], **common),
        }
        self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder[TINY_REFINER], **common)
        self.scheduler_config = self.loaded[TINY_BASE].scheduler.config

    def _pipe(self, source: Any, inpaint: bool, *, refiner: bool) -> Any:
        cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
        flags = {"requires_aesthetics_score": refiner, "force_zeros_for_empty_prompt": not refiner}
        pipe = cls(**source.components, add_watermarker=False, **flags)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self, split: Split, *, mask: Image.Image | None = None, base: str = TINY_BASE, **extra: Any) -> Image.Image:
        """The image diffusers makes; with a mask, pasted over the input as the server does (diffusers' own
        `apply_overlay`), unless `padding_mask_crop` is given and diffusers pastes it itself."""
        torch.set_num_threads(cpu_threads())  # the server's CPU worker's count: the same summation order
        inpaint = mask is not None
        steps, strength = split.steps, split.strength
        first = steps - math.floor(steps * strength)
        make = SAMPLERS[split.sampler]  # type: ignore[index]  # the enum's values are its ints
        generator = torch.Generator("cpu").manual_seed(split.seed)
        args: dict[str, Any] = {"prompt": PROMPT, "num_inference_steps": steps, "guidance_scale": 7.0, **extra}
        if inpaint:
            args.update(mask_image=mask, height=64, width=64)
        base_pipe = self._pipe(self.loaded[base], inpaint, refiner=False)
        refiner = self._pipe(self.refiner, inpaint, refiner=True)
        for pipe in (base_pipe, refiner):
            pipe.scheduler = make_scheduler(make, self.scheduler_config)
        if split.base_steps is None:  # no refiner
            image = base_pipe(**args, image=seed_image(), strength=strength, generator=generator).images[0]
        elif split.base_steps <= first:  # refine-only: the refiner's own img2img
            image = refiner(**args, image=seed_image(), strength=strength, generator=generator).images[0]
        else:
            grid = make_scheduler(make, self.scheduler_config)
            grid.set_timesteps(steps)
            # The fraction whose integer cutoff lands exactly between grid entries k-1 and k.
            fraction = 1 - (math.floor(float(grid.timesteps[split.base_steps])) + 1) / 1000
            latents = base_pipe(
                **args,
                image=seed_image(),
                strength=strength,
                denoising_end=fraction,
                generator=generator,
                output_type="latent",
            ).images
            image = refiner(**args, image=latents, denoising_start=fraction, generator=generator).images[0]
        if inpaint and "padding_mask_crop" not in extra:
            image = VaeImageProcessor(vae_scale_factor=8).apply_overlay(mask, seed_image(), image)
        assert isinstance(image, Image.Image)
        return image


@pytest.fixture(scope="module")
def by_hand(model_store: ModelStore) -> ByHand:
    return ByHand(model_store)


def generate(stub: pb_grpc.GenerationServiceStub, **fields: Any) -> tuple[list[Any], list[Any]]:
    responses = collect(stub, request(**fields))
    return events(responses, "image"), events(responses, "progress")


# (steps, strength, refiner start_step) per sampler: the hand-off lands where diffusers' integer cutoff can split.
IMG2IMG_SPLITS: dict[int, tuple[int, float, int]] = {
    pb.SCHEDULER_EULER: (10, 0.6, 8),
    pb.SCHEDULER_EULER_ANCESTRAL: (10, 0.7, 9),
    pb.SCHEDULER_DDIM: (8, 0.75, 6),
    pb.SCHEDULER_DPMPP_2M: (12, 0.5, 10),
    pb.SCHEDULER_DPMPP_2M_KARRAS: (12, 0.75, 10),
    pb.SCHEDULER_UNIPC: (8, 1.0, 6),
}


@pytest.mark.parametrize("scheduler", ALL_SAMPLERS)
def test_img2img_with_refiner_equals_diffusers_by_hand(
    stub: pb_grpc.GenerationServiceStub, by_hand: ByHand, scheduler: int
) -> None:
    steps, strength, start = IMG2IMG_SPLITS[scheduler]
    (image,), _ = generate(
        stub,
        steps=steps,
        strength=strength,
        scheduler=scheduler,
        refiner=pb.Refiner(model=TINY_REFINER, start_step=start),
    )
    runs = math.floor(steps * strength)
    assert image.mode == pb.IMAGE_MODE_IMG2IMG and image.first_step == steps - runs + 1
    assert (image.base_steps, image.refiner_steps) == (start - 1 - (steps - runs), steps - start + 1)
    expected = by_hand.run(Split(steps, strength, start - 1, scheduler))
    assert numpy.array_equal(rgb(decode(image.data)), rgb(expected))


@pytest.mark.parametrize("scheduler", ALL_SAMPLERS)
def test_refine_only_equals_the_refiners_img2img_by_hand(
    stub: pb_grpc.GenerationServiceStub, by_hand: ByHand, scheduler: int
) -> None:
    (image,), progress = generate(
        stub, steps=10, strength=0.4, scheduler=scheduler, refiner=pb.Refiner(model=TINY_REFINER, start_step=1)
    )
    assert (image.base_steps, image.refiner_steps, image.first_step) == (0, 4, 7)
    assert [p.stage for p in progress] == [pb.STAGE_REFINER] * 4
    expected = by_hand.run(Split(10, 0.4, 0, scheduler))
    assert numpy.array_equal(rgb(decode(image.data)), rgb(expected))


@pytest.mark.parametrize("scheduler", ALL_SAMPLERS)
def test_inpainting_through_the_hand_off_equals_diffusers_by_hand(
    stub: pb_grpc.GenerationServiceStub, by_hand: ByHand, scheduler: int
) -> None:
    steps, strength, start = IMG2IMG_SPLITS[scheduler]
    (image,), _ = generate(
        stub,
        steps=steps,
        strength=strength,
        scheduler=scheduler,
        mask=pb.ImageInput(data=png(mask_image())),
        refiner=pb.Refiner(model=TINY_REFINER, start_step=start),
    )
    assert image.mode == pb.IMAGE_MODE_INPAINT
    got = rgb(decode(image.data))
    expected = by_hand.run(Split(steps, strength, start - 1, scheduler), mask=mask_image())
    assert numpy.array_equal(got, rgb(expected))
    keep = numpy.asarray(mask_image().convert("L")) == 0
    assert numpy.array_equal(got[keep], rgb(seed_image())[keep]), "outside the mask the input survives both stages"
    assert not numpy.array_equal(got[~keep], rgb(seed_image())[~keep]), "inside the mask it is repainted"


@pytest.mark.parametrize("scheduler", [pb.SCHEDULER_EULER_ANCESTRAL, pb.SCHEDULER_DPMPP_2M_KARRAS])
def test_a_9_channel_inpainting_base_equals_diffusers_by_hand(
    stub: pb_grpc.GenerationServiceStub, by_hand: ByHand, scheduler: int
) -> None:
    steps, strength, start = IMG2IMG_SPLITS[scheduler]
    (image,), _ = generate(
        stub,
        model=TINY_INPAINT,
        steps=steps,
        strength=strength,
        scheduler=scheduler,
        mask=pb.ImageInput(data=png(mask_image())),
        refiner=pb.Refiner(model=TINY_REFINER, start_step=start),
    )
    expected = by_hand.run(Split(steps, strength, start - 1, scheduler), mask=mask_image(), base=TINY_INPAINT)
    assert numpy.array_equal(rgb(decode(image.data)), rgb(expected))


def test_mask_margin_equals_diffusers_padding_mask_crop(stub: pb_grpc.GenerationServiceStub, by_hand: ByHand) -> None:
    mask = numpy.zeros((128, 64), dtype=numpy.uint8)
    mask[80:104, 16:40] = 255
    big_mask = Image.fromarray(mask, "L").convert("RGB")
    tall = Image.fromarray(numpy.concatenate([rgb(seed_image()), rgb(seed_image())[::-1]]).astype(numpy.uint8))
    (image,), _ = generate(
        stub,
        steps=8,
        strength=0.75,
        image=pb.ImageInput(data=png(tall)),
        mask=pb.ImageInput(data=png(big_mask)),
        mask_margin=8,
        width=64,
        height=64,
    )
    assert (image.width, image.height) == (64, 128), "the result keeps the input's size"

    def run_by_hand() -> Image.Image:
        torch.set_num_threads(cpu_threads())
        pipe = by_hand._pipe(by_hand.loaded[TINY_BASE], True, refiner=False)
        pipe.scheduler = make_scheduler(SAMPLERS[pb.SCHEDULER_EULER], by_hand.scheduler_config)
        return pipe(  # type: ignore[no-any-return]
            prompt=PROMPT,
            image=tall,
            mask_image=big_mask,
            padding_mask_crop=8,
            height=64,
            width=64,
            strength=0.75,
            num_inference_steps=8,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(1234),
        ).images[0]

    assert numpy.array_equal(rgb(decode(image.data)), rgb(run_by_hand()))


@pytest.mark.parametrize(
    ("steps", "strength", "refiner", "counts"),
    [
        # The example: base 16..27, refiner 28..30.
        (30, 0.5, pb.Refiner(model=TINY_REFINER, start_step_percentage=90), (16, 12, 3)),
        (30, 0.5, pb.Refiner(model=TINY_REFINER, start_step=16), (16, 0, 15)),  # at the first step: refine-only
        (30, 0.5, pb.Refiner(model=TINY_REFINER, start_step=10), (16, 0, 15)),  # before it: refine-only too
        (30, 0.5, pb.Refiner(model=TINY_REFINER, start_step=17), (16, 1, 14)),
        (30, 0.7, None, (10, 21, 0)),  # 0.7 read to 4 decimals: 21 steps, not float32's 20
        (20, 0.05, None, (20, 1, 0)),
        (20, 1.0, pb.Refiner(model=TINY_REFINER, start_step=1), (1, 0, 20)),
    ],
)
def test_strength_and_refiner_start_give_the_stated_counts(
    stub: pb_grpc.GenerationServiceStub,
    steps: int,
    strength: float,
    refiner: pb.Refiner | None,
    counts: tuple[int, int, int],
) -> None:
    fields: dict[str, Any] = {"steps": steps, "strength": strength}
    if refiner is not None:
        fields["refiner"] = refiner
    (image,), progress = generate(stub, **fields)
    first, base_steps, refiner_steps = counts
    assert (image.first_step, image.base_steps, image.refiner_steps) == counts
    assert [p.stage for p in progress] == [pb.STAGE_BASE] * base_steps + [pb.STAGE_REFINER] * refiner_steps
    assert [p.overall_step for p in progress] == list(range(1, base_steps + refiner_steps + 1))
    assert {p.total_steps for p in progress} == {steps - first + 1}


@pytest.mark.parametrize("mask", [False, True])
def test_compare_from_an_image_gives_both_requests_images(stub: pb_grpc.GenerationServiceStub, mask: bool) -> None:
    extra: dict[str, Any] = {"steps": 10, "strength": 0.6, "scheduler": pb.SCHEDULER_DPMPP_2M}
    if mask:
        extra["mask"] = pb.ImageInput(data=png(mask_image()))
    refiner = pb.Refiner(model=TINY_REFINER, start_step=8)
    alone_base, _ = generate(stub, **extra)
    alone_refined, _ = generate(stub, refiner=refiner, **extra)
    compared = pb.Refiner(model=TINY_REFINER, start_step=8, compare=True)
    (base_only, refined), progress = generate(stub, refiner=compared, **extra)
    assert base_only.branch == pb.BRANCH_BASE_ONLY and (base_only.base_steps, base_only.refiner_steps) == (6, 0)
    assert numpy.array_equal(rgb(decode(base_only.data)), rgb(decode(alone_base[0].data)))
    assert numpy.array_equal(rgb(decode(refined.data)), rgb(decode(alone_refined[0].data)))
    assert len(progress) == 6 + 3 and progress[-1].overall_step == progress[-1].total_steps == 9


def test_compare_with_refine_only(stub: pb_grpc.GenerationServiceStub) -> None:
    extra: dict[str, Any] = {"steps": 10, "strength": 0.5}
    alone_base, _ = generate(stub, **extra)
    alone_refined, _ = generate(stub, refiner=pb.Refiner(model=TINY_REFINER, start_step=1), **extra)
    compared = pb.Refiner(model=TINY_REFINER, start_step=1, compare=True)
    (base_only, refined), progress = generate(stub, refiner=compared, **extra)
    assert (refined.base_steps, refined.refiner_steps) == (0, 5)
    assert numpy.array_equal(rgb(decode(base_only.data)), rgb(decode(alone_base[0].data)))
    assert numpy.array_equal(rgb(decode(refined.data)), rgb(decode(alone_refined[0].data)))
    assert [p.branch for p in progress] == [pb.BRANCH_BASE_ONLY] * 5 + [pb.BRANCH_UNSPECIFIED] * 5


def test_several_results_each_equal_their_seed_alone(stub: pb_grpc.GenerationServiceStub) -> None:
    extra: dict[str, Any] = {"steps": 10, "strength": 0.6, "mask": pb.ImageInput(data=png(mask_image()))}
    images, _ = generate(stub, number_results=3, seed=50, **extra)
    assert [i.seed for i in images] == [50, 51, 52]
    for image in images:
        (alone,), _ = generate(stub, seed=image.seed, **extra)
        # A batch of 3 may sum in another order than a batch of 1: a level here and there, as for text.
        differing = numpy.abs(rgb(decode(image.data)) - rgb(decode(alone.data)))
        assert differing.max() <= 2 and (differing > 0).mean() < 0.005, f"result {image.index} is not its seed's"


def test_an_uploaded_image_is_named_by_reference(stub: pb_grpc.GenerationServiceStub) -> None:
    data = png(seed_image())
    header = pb.UploadHeader(size_bytes=len(data))
    parts = [pb.UploadImageRequest(header=header)] + [
        pb.UploadImageRequest(data=data[i : i + 4096]) for i in range(0, len(data), 4096)
    ]
    uploaded = stub.UploadImage(iter(parts), timeout=30)
    by_reference, _ = generate(stub, steps=6, strength=0.5, image=pb.ImageInput(reference=uploaded.reference))
    inline, _ = generate(stub, steps=6, strength=0.5)
    assert by_reference[0].data == inline[0].data


def test_a_bfloat16_vae_survives_encoding_a_seed_image(store_settings: StoreSettings, model_store: ModelStore) -> None:
    """Encoding a seed image moves a float16-or-bfloat16 VAE to float32 and back to the UNet's dtype (diffusers'
    force_upcast); a VAE tuned to decode in bfloat16 must be put back, or this request and every later one fail."""
    settings = make_settings(store_settings, speed=Speed(vae_decode="bfloat16"))
    thread = ServerThread(settings, store=model_store)
    try:
        thread.wait_ready()
        with grpc.insecure_channel(thread.address) as channel:
            tuned = new_stub(channel)
            mask = pb.ImageInput(data=png(mask_image()))
            text = request(steps=4, refiner=pb.Refiner(model=TINY_REFINER))
            text.ClearField("image")
            for req in (
                text,
                request(steps=4, strength=0.5, refiner=pb.Refiner(model=TINY_REFINER)),
                request(steps=4, strength=0.5, mask=mask, refiner=pb.Refiner(model=TINY_REFINER)),
                text,
            ):
                (image,) = events(collect(tuned, req), "image")
                assert image.data
    finally:
        thread.close()
