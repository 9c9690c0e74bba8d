"""Protobuf for the model cache: `modelstore` values become `refinery.v1` ModelService messages."""

from __future__ import annotations

from modelstore.cache import CachedModel
from modelstore.progress import DownloadProgress
from modelstore.record import Architecture
from refinery.v1 import models_pb2 as pb

ARCHITECTURES: dict[Architecture, pb.Architecture] = {
    Architecture.SDXL_BASE: pb.ARCHITECTURE_SDXL_BASE,
    Architecture.SDXL_REFINER: pb.ARCHITECTURE_SDXL_REFINER,
    Architecture.SD1: pb.ARCHITECTURE_SD1,
    Architecture.SD2: pb.ARCHITECTURE_SD2,
    Architecture.SD3: pb.ARCHITECTURE_SD3,
    Architecture.FLUX: pb.ARCHITECTURE_FLUX,
    Architecture.UNKNOWN: pb.ARCHITECTURE_UNKNOWN,
}


def model_info(model: CachedModel, *, resident: bool) -> pb.ModelInfo:
    info = pb.ModelInfo(
        model=model.air,
        size_bytes=model.size_bytes,
        architecture=ARCHITECTURES[model.architecture],
        pinned=model.pinned,
        resident=resident,
        sha256=model.sha256,
        in_use=model.in_use,
    )
    info.added.FromDatetime(model.added)
    info.last_used.FromDatetime(model.last_used)
    return info


def pull_progress(progress: DownloadProgress) -> pb.PullModelResponse:
    return pb.PullModelResponse(
        progress=pb.PullProgress(
            bytes_done=max(progress.bytes_done, 0),
            bytes_total=max(progress.bytes_total, 0),
            bytes_per_second=max(progress.rate_bps, 0.0),
            verifying=progress.verifying,
            file=progress.file,
        )
    )
