"""`refinery models verify [AIR]`: the full check of cached models, one line per model on stdout.

    civitai:101055@128078: intact (6.9 GB read)
    builtin:tiny-sdxl-base@1: REPAIRED: unet/diffusion_pytorch_model.safetensors does not match its SHA256 ...
    2 models: 1 intact, 1 repaired

Progress bars (one per model, on a terminal) go to stderr. The exit status is 1 when a model stays damaged.
"""

from __future__ import annotations

from collections import Counter

from modelstore.units import format_bytes
from refinery.v1 import models_pb2 as pb
from refinery.v1 import models_pb2_grpc as pb_grpc
from server.cli.terminal import PullView

_VERDICTS = {
    pb.VerifyResult.VERDICT_INTACT: "intact",
    pb.VerifyResult.VERDICT_REPAIRED: "repaired",
    pb.VerifyResult.VERDICT_CORRUPT: "corrupt",
    pb.VerifyResult.VERDICT_SKIPPED: "skipped",
}


async def verify_models(stub: pb_grpc.ModelServiceStub, model: str) -> int:
    """Verify `model` (empty: every cached model); the exit status."""
    counts: Counter[str] = Counter()
    view: PullView | None = None
    try:
        async for response in stub.VerifyModel(pb.VerifyModelRequest(model=model)):
            if response.WhichOneof("event") == "progress":
                progress = response.progress
                if view is None or view.model != progress.model:
                    if view is not None:
                        view.close(completed=False)
                    view = PullView(progress.model)
                view.show(progress)
                continue
            if view is not None:
                view.close(completed=False)
                view = None
            result = response.result
            counts[_VERDICTS.get(result.verdict, "unknown")] += 1
            print(_line(result), flush=True)
    finally:
        if view is not None:
            view.close(completed=False)
    total = sum(counts.values())
    parts = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
    print(f"{total} model{'' if total == 1 else 's'}" + (f": {parts}" if parts else " in the cache"))
    return 1 if counts["corrupt"] or counts["unknown"] else 0


def _line(result: pb.VerifyResult) -> str:
    verdict = _VERDICTS.get(result.verdict, "unknown")
    if verdict == "intact":
        return f"{result.model}: intact ({format_bytes(result.bytes_checked)} read)"
    if verdict == "skipped":
        return f"{result.model}: skipped ({result.message})"
    return f"{result.model}: {verdict.upper()}: {result.message}"
