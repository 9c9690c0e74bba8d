"""Requests that start from an image (issue 18), measured through a server's gRPC API like any client's: the
interleaved comparison of text-to-image, img2img and inpainting that `bench_image_inputs.py` runs on the CPU
and `gpu_sdxl.py --only images` at full size, and the upload in 64 KiB messages against one message.

A server here is anything with a GenerationService `stub` and the server's own per-request `timings()`:
`_service.Service` (a `refinery serve` process, its JSON log) or `bench_image_inputs.Served` (in this process,
its log records). The input image and mask are uploaded once (UploadImage) and named by reference, so every
request is the same few hundred bytes whatever the image's size.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy
from PIL import Image

from benchmarks._service import PROMPT, SEED, median_timings
from refinery.v1 import generation_pb2 as pb

CHUNK = 64 * 1024  # what the clients send per UploadImage message (refinery.client, the CLI)
MB = 1e6


class Server(Protocol):
    stub: Any  # a GenerationServiceStub (generated, unannotated)

    def timings(self) -> list[dict[str, float]]: ...


@dataclass(frozen=True)
class Inputs:
    """References of the uploaded input image and mask, and the mask's pixels (white: repaint)."""

    image: str
    mask: str
    image_rgb: numpy.ndarray[Any, Any]
    keep: numpy.ndarray[Any, Any]  # True where the mask keeps the input


@dataclass(frozen=True)
class Variant:
    """One kind of request: text-to-image (`strength` None), img2img, or inpainting (`mask`)."""

    strength: float | None = None
    mask: bool = False
    refiner: bool = False
    model: str = ""  # empty: the server's default base

    def request(self, inputs: Inputs, size: int, steps: int) -> pb.GenerateRequest:
        request = pb.GenerateRequest(
            positive_prompt=PROMPT, model=self.model, width=size, height=size, steps=steps, seed=SEED, cfg_scale=7.0
        )
        if self.refiner:
            request.refiner.CopyFrom(pb.Refiner(start_step_percentage=90))
        if self.strength is not None:
            request.image.CopyFrom(pb.ImageInput(reference=inputs.image))
            request.strength = self.strength
        if self.mask:
            request.mask.CopyFrom(pb.ImageInput(reference=inputs.mask))
        return request


@dataclass(frozen=True)
class Call:
    seconds: float
    rgb: numpy.ndarray[Any, Any]
    steps_run: tuple[int, int]  # (base, refiner) as the Image reports them
    mode: str
    first_step: int


def call(server: Server, variant: Variant, inputs: Inputs, size: int, steps: int) -> Call:
    """One Generate, timed from the call to the image in hand (PNG decoded afterwards, untimed)."""
    started = time.perf_counter()
    try:
        responses = server.stub.Generate(variant.request(inputs, size, steps), timeout=900)
        images = [r.image for r in responses if r.image.data]
    except grpc.RpcError as error:  # INTERNAL hides the cause from clients; a server process's log has it
        tail = server.log_tail() if hasattr(server, "log_tail") else "(in this process: logged above)"
        raise RuntimeError(f"Generate ({variant}) failed: {error}; the server's log ends:\n{tail}") from error
    seconds = time.perf_counter() - started
    assert len(images) == 1, f"expected one image, got {len(images)}"
    image = images[0]
    rgb = numpy.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
    steps_run = (image.base_steps, image.refiner_steps)
    return Call(seconds, rgb, steps_run, pb.ImageMode.Name(image.mode), image.first_step)


def noise_png(side: int, seed: int) -> bytes:
    """A side x side PNG of random pixels: incompressible, so about 3 bytes a pixel (3.1 MB at 1024)."""
    rgb = numpy.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=numpy.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def mask_png(side: int) -> tuple[bytes, numpy.ndarray[Any, Any]]:
    """A centred white square half the side (a quarter of the pixels repainted), and where it keeps."""
    mask = numpy.zeros((side, side), dtype=numpy.uint8)
    mask[side // 4 : side * 3 // 4, side // 4 : side * 3 // 4] = 255
    out = io.BytesIO()
    Image.fromarray(mask, "L").save(out, format="PNG")
    return out.getvalue(), mask == 0


def upload(stub: Any, data: bytes, chunk: int, sha256: str) -> tuple[float, pb.UploadImageResponse]:
    """UploadImage of `data` in messages of `chunk` bytes after the header: seconds to the server's answer."""

    def messages() -> Iterator[pb.UploadImageRequest]:
        yield pb.UploadImageRequest(header=pb.UploadHeader(size_bytes=len(data), sha256=sha256))
        for start in range(0, len(data), chunk):
            yield pb.UploadImageRequest(data=data[start : start + chunk])

    started = time.perf_counter()
    answer = stub.UploadImage(messages(), timeout=300)
    return time.perf_counter() - started, answer


def upload_inputs(server: Server, size: int) -> Inputs:
    """The input image (noise: timing does not depend on content) and the mask, uploaded once."""
    image = noise_png(size, seed=18)
    mask, keep = mask_png(size)
    refs = [upload(server.stub, data, CHUNK, hashlib.sha256(data).hexdigest())[1].reference for data in (image, mask)]
    return Inputs(refs[0], refs[1], numpy.asarray(Image.open(io.BytesIO(image)).convert("RGB")), keep)


def stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(values), 4),
        "min_s": round(min(values), 4),
        "runs_s": [round(v, 4) for v in values],
    }


class Checks:
    """What every image must show: the same request gives the same pixels every time, an inpainted image
    keeps the input outside the mask (mask_blur 0), and the mode and steps the image reports are the ones asked
    (the last floor(N x strength) steps of the N-step grid)."""

    def __init__(self, inputs: Inputs, steps: int) -> None:
        self.inputs = inputs
        self.steps = steps
        self.first: dict[str, Call] = {}
        self.problems: list[str] = []

    def see(self, name: str, variant: Variant, got: Call) -> None:
        known = self.first.setdefault(name, got)
        if not numpy.array_equal(known.rgb, got.rgb):
            self.problems.append(f"{name}: the same request gave other pixels")
        ran = sum(got.steps_run)
        wanted = self.steps if variant.strength is None else int(self.steps * variant.strength)
        if ran != wanted or got.first_step != self.steps - wanted + 1:
            self.problems.append(
                f"{name}: the image reports {got.steps_run} steps run from step {got.first_step}, wanted {wanted}"
            )
        mode = "IMAGE_MODE_" + ("UNSPECIFIED" if variant.strength is None else "INPAINT" if variant.mask else "IMG2IMG")
        if got.mode != mode:
            self.problems.append(f"{name}: the image reports {got.mode}, wanted {mode}")
        if variant.mask:
            worst = int(numpy.abs(got.rgb.astype(int) - self.inputs.image_rgb)[self.inputs.keep].max())
            if worst:
                self.problems.append(f"{name}: outside the mask the result differs from the input by up to {worst}")

    def distinct(self, names: Sequence[str]) -> None:
        """Text-to-image, img2img and inpainting must give different images."""
        seen: dict[bytes, str] = {}
        for name in names:
            digest = hashlib.sha256(self.first[name].rgb.tobytes()).digest()
            if digest in seen:
                self.problems.append(f"{name} gave the same pixels as {seen[digest]}")
            seen.setdefault(digest, name)


def interleaved(
    server: Server, variants: dict[str, Variant], inputs: Inputs, args: argparse.Namespace, checks: Checks
) -> dict[str, Any]:
    """Each variant once per round after `args.warmup` rounds, the order turned by one each round (so no
    variant always follows the same one); medians, minima and the server's own stage timings."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    seen: dict[str, Call] = {}
    for round_ in range(args.warmup + args.reps):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            server.timings()
            got = call(server, variants[name], inputs, args.size, args.steps)
            checks.see(name, variants[name], got)
            seen[name] = got
            if round_ >= args.warmup:
                times[name].append(got.seconds)
                stages[name] += server.timings()
    return {
        name: {
            **stats(times[name]),
            "server_stages_s": median_timings(stages[name]),
            "steps_run": list(seen[name].steps_run),
            "mode": seen[name].mode,
            "first_step": seen[name].first_step,
        }
        for name in names
    }


def variants(args: argparse.Namespace) -> tuple[dict[str, Variant], list[tuple[str, str]]]:
    """The requests compared, and the pairs whose ratio is the figure: img2img at `args.strength` against
    text-to-image with the same steps, inpainting against img2img of the same shape and strength, each without
    and with the refiner (from 90 %), and inpainting on `args.inpaint_model` (a 9-channel UNet) when named."""
    s = args.strength
    found = {
        "text": Variant(),
        "img2img": Variant(strength=s),
        "inpaint": Variant(strength=s, mask=True),
        "text_refiner": Variant(refiner=True),
        "img2img_refiner": Variant(strength=s, refiner=True),
        "inpaint_refiner": Variant(strength=s, mask=True, refiner=True),
    }
    pairs = [
        ("img2img", "text"),
        ("img2img_refiner", "text_refiner"),
        ("inpaint", "img2img"),
        ("inpaint_refiner", "img2img_refiner"),
    ]
    if args.inpaint_model:
        found["inpaint_9ch"] = Variant(strength=s, mask=True, model=args.inpaint_model)
        pairs.append(("inpaint_9ch", "img2img"))
    return found, pairs


def modes(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison on `server`: inputs uploaded, every variant interleaved, the ratios, the checks."""
    inputs = upload_inputs(server, args.size)
    found, pairs = variants(args)
    checks = Checks(inputs, args.steps)
    figures = interleaved(server, found, inputs, args, checks)
    checks.distinct(["text", "img2img", "inpaint"])
    ratios = {f"{a}/{b}": round(figures[a]["median_s"] / figures[b]["median_s"], 3) for a, b in pairs}
    return {"requests": figures, "ratios": ratios, "problems": checks.problems}


def uploads(chunked: Any, whole: Any, args: argparse.Namespace) -> dict[str, Any]:
    """A `args.upload_side`² noise PNG through UploadImage in 64 KiB messages (`chunked`, a server with the
    default 128 KiB request limit) against the same bytes in one message (`whole`, a server whose limit was
    raised for this alone), alternating. Each round uploads new bytes (one pixel changed), so every upload
    writes and fsyncs its file: the same bytes again would only extend the stored copy's time."""
    rgb = numpy.random.default_rng(7).integers(0, 256, (args.upload_side, args.upload_side, 3), dtype=numpy.uint8)
    sides = {"chunks_64k": (chunked, CHUNK), "one_message": (whole, 1 << 30)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    size = 0
    for round_ in range(args.warmup + args.reps):
        rgb[0, 0, 0] = round_ % 256
        rgb[0, 1, 0] = round_ // 256
        out = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(out, format="PNG", compress_level=1)
        data = out.getvalue()
        size, digest = len(data), hashlib.sha256(data).hexdigest()
        for name, (stub, chunk) in (sides if round_ % 2 else dict(reversed(sides.items()))).items():
            seconds, answer = upload(stub, data, chunk, digest)
            assert answer.size_bytes == size and answer.width == args.upload_side, answer
            if round_ >= args.warmup:
                times[name].append(seconds)
    figures: dict[str, Any] = {"side": args.upload_side, "png_bytes": size}
    for name, values in times.items():
        figures[name] = {**stats(values), "mb_per_s": round(size / MB / statistics.median(values), 1)}
    ratio = figures["chunks_64k"]["median_s"] / figures["one_message"]["median_s"]
    figures["ratio_chunks_to_one_message"] = round(ratio, 3)
    return figures
