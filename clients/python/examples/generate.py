"""Refinery from Python: stream a refined generation with its progress, save the image, then show how a bad
request is refused (the client decodes google.rpc.BadRequest for you).

    pip install ./clients/python          # refinery-client: grpcio and protobuf, no torch
    python generate.py [HOST:PORT] [OUT.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

from refinery.client import Client, Image, ModelLoading, Progress, Queued, Refiner, RefineryError, token_from_env


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "localhost:50051"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "lighthouse.png")
    with Client(target, token=token_from_env()) as client:
        events = client.generate(
            "a lighthouse on a cliff at dusk",
            steps=20,
            seed=7,
            refiner=Refiner(start_percentage=90),  # no model: the server's default refiner
            request_id="example-python-1",  # echoed on every event and in the server's log
            timeout=600,
        )
        for event in events:
            if isinstance(event, Queued):
                print(f"queued: position {event.position} of {event.queue_depth}")
            elif isinstance(event, ModelLoading):
                print(f"{event.phase} {event.role} {event.model}")
            elif isinstance(event, Progress):
                print(f"{event.stage} {event.step}/{event.stage_steps} (step {event.overall_step}/{event.total_steps})")
            elif isinstance(event, Image):
                out.write_bytes(event.data)  # whole, even when it arrived in chunks
                print(f"wrote {out} ({event.width}x{event.height}, seed {event.seed}, request {event.request_id})")
                print(f"{event.base_steps} base + {event.refiner_steps} refiner steps")

        # A bad request: the refiner cannot take over at step 30 of 20.
        try:
            list(client.generate("a cat", steps=20, refiner=Refiner(start_step=30)))
            sys.exit("the server accepted a bad request")
        except RefineryError as error:
            print(f"refused: {error.code.name}: {error.message}")
            for violation in error.field_violations:
                print(f"  {violation.field}: {violation.description}")


if __name__ == "__main__":
    main()
