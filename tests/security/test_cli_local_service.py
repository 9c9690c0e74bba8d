"""`refinery models` without --server runs a ModelService over the caller's cache on a loopback port, which any
user of the machine can reach: it answers only the command's own client (issue 21, item 3)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from modelstore import StoreSettings
from refinery.client import AsyncClient, RefineryError
from server.cli.models import _local_service


def test_the_local_model_service_answers_only_its_own_command(tmp_path: Path) -> None:
    async def calls() -> tuple[RefineryError, RefineryError, int]:
        async with _local_service(StoreSettings(cache_dir=tmp_path / "cache"), ()) as (address, run_token):
            async with AsyncClient(address) as stranger:
                with pytest.raises(RefineryError) as listing:
                    await stranger.list_models()
            async with AsyncClient(address, token="guess", admin_token="guess") as guesser:
                with pytest.raises(RefineryError) as deleting:
                    await guesser.delete_model("builtin:tiny-sdxl-base@1")
            async with AsyncClient(address, token=run_token, admin_token=run_token) as own:
                listed = len((await own.list_models()).models)
        return listing.value, deleting.value, listed

    listing, deleting, listed = asyncio.run(calls())
    assert listing.code is grpc.StatusCode.UNAUTHENTICATED
    assert deleting.code is grpc.StatusCode.UNAUTHENTICATED
    assert listed == 0  # the command's own client is answered: an empty cache
