"""What a PNG result costs to encode at 1024x1024, by zlib level, and what each level costs in size.

    .venv/bin/python benchmarks/bench_encode.py            # levels 0-9, 7 rounds, about a minute on 2 cores
    .venv/bin/python benchmarks/bench_encode.py --quick    # 256x256, levels 1 and 6, one round: does it run

The image stands in for a generated one: smooth shapes and gradients with fine texture and a little grain,
which compresses like a photograph (a few MB at Pillow's default level), unlike the noise a random-weight
model makes (incompressible at any level). Levels are timed interleaved, round after round, so a busy machine
slows them alike; every output is decoded and compared with the source pixel for pixel.
Pillow's own default, `compress_level` 6, is what the service used before `--png-level`.
Part 2: four images (a batch of 4) encoded one after another against on 2 and 4 threads at once, as the
service's encoder threads now do: Pillow releases the GIL while it compresses.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._quick import parse_args
from server.core.domain import ImageFormat
from server.generation.encoding import encode_image

PILLOW_DEFAULT = 6


def natural_image(size: int = 1024, seed: int = 0) -> Image.Image:
    """A deterministic stand-in for a generated picture (see the module docstring)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = []
    for c in range(3):
        field = np.zeros((size, size))
        for octave in (4, 16, 64):  # smooth structure at three scales: low-resolution noise, upsampled
            coarse = rng.normal(0, 1, (octave, octave))
            field += np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BICUBIC)) / (
                octave**0.5
            )
        field += 0.8 * np.sin(2 * np.pi * (3 + c) * x + 4 * y)  # gradients and bands
        channels.append(field)
    img = np.stack(channels, -1)
    img = (img - img.min()) / (img.max() - img.min()) * 235 + 10
    img += rng.normal(0, 2.0, img.shape)  # sensor-like grain
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def by_level(image: Image.Image, levels: list[int], rounds: int) -> dict[int, tuple[float, int]]:
    """Median seconds and bytes per level, each output checked lossless."""
    times: dict[int, list[float]] = {level: [] for level in levels}
    sizes: dict[int, int] = {}
    for _ in range(rounds):
        for level in levels:
            started = time.perf_counter()
            data = encode_image(image, ImageFormat.PNG, png_level=level)
            times[level].append(time.perf_counter() - started)
            sizes[level] = len(data)
    for level in levels:
        decoded = Image.open(io.BytesIO(encode_image(image, ImageFormat.PNG, png_level=level)))
        assert decoded.tobytes() == image.tobytes(), f"level {level} is not lossless"
    return {level: (statistics.median(times[level]), sizes[level]) for level in levels}


def batch_of_four(image: Image.Image, level: int, rounds: int) -> dict[int, float]:
    """Median seconds to encode 4 images: serially (1) and on 2 and 4 threads."""
    images = [image.rotate(90 * i) for i in range(4)]
    times: dict[int, list[float]] = {1: [], 2: [], 4: []}
    for _ in range(rounds):
        for threads in times:
            with ThreadPoolExecutor(threads) as pool:
                started = time.perf_counter()
                list(pool.map(lambda im: encode_image(im, ImageFormat.PNG, png_level=level), images))
                times[threads].append(time.perf_counter() - started)
    return {threads: statistics.median(t) for threads, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--levels", default="0,1,2,3,4,6,9")
    args = parse_args(parser, {"size": 256, "rounds": 1, "levels": "1,6"})
    image = natural_image(args.size)
    levels = [int(v) for v in args.levels.split(",")]
    results = by_level(image, levels, args.rounds)
    base_s, base_bytes = results.get(PILLOW_DEFAULT, next(iter(results.values())))
    print(f"PNG of a {args.size}x{args.size} picture, median of {args.rounds} (Pillow's default level is 6)")
    print(f"  {'level':>5} {'ms':>8} {'MB':>7} {'time vs 6':>10} {'size vs 6':>10}")
    for level, (seconds, nbytes) in results.items():
        ratios = f"{seconds / base_s:9.2f}x {nbytes / base_bytes:9.3f}x"
        print(f"  {level:>5} {seconds * 1000:8.1f} {nbytes / 1e6:7.3f} {ratios}")
    batch = batch_of_four(image, 1, args.rounds)
    print("four images at level 1: " + ", ".join(f"{n} thread(s) {s * 1000:.0f} ms" for n, s in batch.items()))


if __name__ == "__main__":
    main()
