"""Refinery from Python, starting from an image: upload it (UploadImage, streamed in 64 KiB pieces after a header
with its size and sha256), run img2img over it with a refiner, keep the result on the server, and save it.

    pip install ./clients/python
    python img2img.py [HOST:PORT] [OUT.png] [IN.png]

IN.png: a PNG, JPEG or WebP whose sides are multiples of 8 (e.g. a result of generate.py). `client.generate`
also takes the path itself (`image=Path("in.png")`) and uploads it for you when it is over 96 KiB; here the upload
is separate to show its answer.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from refinery.client import Client, Image, Progress, Refiner, token_from_env


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "localhost:50051"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "img2img.png")
    source = Path(sys.argv[3] if len(sys.argv) > 3 else "lighthouse.png")
    with Client(target, token=token_from_env()) as client:
        stored = client.upload_image(source, keep_for=timedelta(minutes=10), timeout=60)
        print(f"uploaded {source} as {stored.reference} ({stored.width}x{stored.height}, kept until {stored.expires})")
        events = client.generate(
            "a lighthouse on a cliff at dawn, oil painting",
            image=stored.reference,
            strength=0.5,  # the last floor(20 x 0.5) = 10 steps of the 20-step grid run: steps 11..20
            steps=20,
            seed=7,
            refiner=Refiner(start_percentage=90),  # the base runs steps 11..18, the refiner 19..20
            keep_results=timedelta(minutes=10),  # the result is named by Image.reference for 10 minutes
            request_id="example-python-img2img",
            timeout=600,
        )
        for event in events:
            if isinstance(event, Progress):  # counts the steps that run (10 here), not the 20-step grid
                print(f"step {event.overall_step}/{event.total_steps}")
            elif isinstance(event, Image):
                out.write_bytes(event.data)
                print(f"wrote {out} ({event.width}x{event.height}, seed {event.seed})")
                ran = f"{event.base_steps} base + {event.refiner_steps} refiner steps"
                print(f"{event.mode} from step {event.first_step}: {ran}")
                print(f"kept as {event.reference}")


if __name__ == "__main__":
    main()
