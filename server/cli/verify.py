"""`refinery models verify [AIR]`: the full check of cached models, one line per model on stdout.

    civitai:101055@128078: intact (6.9 GB read)
    builtin:tiny-sdxl-base@1: REPAIRED: unet/diffusion_pytorch_model.safetensors does not match its SHA256 ...
    2 models: 1 intact, 1 repaired

Progress bars (one per model, on a terminal) go to stderr. The exit status is 1 when a model stays damaged.
"""

from __future__ import annotations

from collections import Counter

from modelstore.units import format_bytes
from refinery.client import AsyncClient, PullProgress, Verdict, VerifyResult
from server.cli.terminal import PullView


async def verify_models(client: AsyncClient, model: str) -> int:
    """Verify `model` (empty: every cached model); the exit status."""
    counts: Counter[str] = Counter()
    view: PullView | None = None
    try:
        async for event in client.verify_model(model):
            if isinstance(event, PullProgress):
                if view is None or view.model != event.model:
                    if view is not None:
                        view.close(completed=False)
                    view = PullView(event.model)
                view.show(event)
                continue
            if view is not None:
                view.close(completed=False)
                view = None
            counts[_verdict(event)] += 1
            print(_line(event), flush=True)
    finally:
        if view is not None:
            view.close(completed=False)
    total = sum(counts.values())
    parts = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
    print(f"{total} model{'' if total == 1 else 's'}" + (f": {parts}" if parts else " in the cache"))
    return 1 if counts["corrupt"] or counts["unknown"] else 0


def _verdict(result: VerifyResult) -> str:
    """A verdict this client does not know (a newer server's) counts as damage: "unknown", exit status 1."""
    return "unknown" if result.verdict is Verdict.UNSPECIFIED else str(result.verdict)


def _line(result: VerifyResult) -> str:
    verdict = _verdict(result)
    if verdict == "intact":
        return f"{result.model}: intact ({format_bytes(result.bytes_checked)} read)"
    if verdict == "skipped":
        return f"{result.model}: skipped ({result.message})"
    return f"{result.model}: {verdict.upper()}: {result.message}"
