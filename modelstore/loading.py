"""Build diffusers pipelines from records in the cache, with no network access.

Only this module and `server/runner.py` talk to diffusers.
"""

from __future__ import annotations

from typing import Any

from modelstore.errors import UnsafeCheckpoint
from modelstore.record import Layout, ModelRecord


def load_pipeline(record: ModelRecord, *, role: str, device: str, dtype: Any) -> Any:
    """A StableDiffusionXLPipeline (role "base") or StableDiffusionXLImg2ImgPipeline ("refiner") on `device`."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if role == "base" else StableDiffusionXLImg2ImgPipeline
    if record.layout is not Layout.DIFFUSERS:
        raise UnsafeCheckpoint(f"{record.canonical}: {record.layout.value} checkpoints cannot be loaded yet")
    pipe = cls.from_pretrained(
        str(record.path),
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,  # never fall back to pickled .bin weights
        add_watermarker=False,
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
