"""An upload's bytes go to disk as they arrive and become an image only if the stream ends whole and agrees with
its header; otherwise nothing is kept and no file is left."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable

import pytest

from server.core.errors import BadImage, ImageError, ImageStoreFull
from server.images import DATA, KEEP_FOR, SHA256, SIZE, ImageStore, Upload

from .conftest import Clock, files_in
from .pictures import encoded, png_claiming


async def _chunks(data: bytes, size: int = 100) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


async def test_an_upload_is_stored_as_its_bytes_arrive(store: ImageStore, clock: Clock) -> None:
    data = encoded(128, 64, "JPEG")
    sha = hashlib.sha256(data).hexdigest()
    stored = await store.upload(Upload(len(data), sha.upper(), keep_for_s=120), _chunks(data))
    assert stored.reference == f"sha256:{sha}" and stored.mime_type == "image/jpeg"
    assert stored.expires_at == clock.now + 120 and stored.path.read_bytes() == data
    assert store.find(stored.reference) == stored


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(60):  # a hang fails the test; never an expectation about speed
        while not condition():  # noqa: ASYNC110  # polls the file system, which signals nothing
            await asyncio.sleep(0.01)


async def _refused(store: ImageStore, upload: Upload, chunks: AsyncIterator[bytes]) -> ImageError:
    with pytest.raises(ImageError) as caught:
        await store.upload(upload, chunks)
    assert files_in(store) == [] and store.used_bytes == 0  # nothing kept, no temporary file left
    return caught.value


async def test_more_bytes_than_declared_keep_nothing(store: ImageStore) -> None:
    data = encoded()
    error = await _refused(store, Upload(len(data) - 1), _chunks(data))
    assert isinstance(error, BadImage) and error.field == SIZE and "more than" in str(error)


async def test_a_stream_that_ends_short_keeps_nothing(store: ImageStore) -> None:
    data = encoded()
    error = await _refused(store, Upload(len(data) + 1), _chunks(data))
    assert error.field == SIZE and f"ended after {len(data)} of the {len(data) + 1} bytes" in str(error)


async def test_bytes_whose_sha256_differs_from_the_declared_one_keep_nothing(store: ImageStore) -> None:
    data = encoded()
    error = await _refused(store, Upload(len(data), hashlib.sha256(b"other").hexdigest()), _chunks(data))
    assert error.field == SHA256


async def test_a_stream_that_breaks_or_is_cancelled_keeps_nothing(store: ImageStore) -> None:
    data = encoded(256, 256, "JPEG")
    arrived = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield data[:100]
        arrived.set()
        await asyncio.Event().wait()  # the client goes quiet, then away
        yield b""

    task = asyncio.create_task(store.upload(Upload(len(data)), stalled()))
    await arrived.wait()
    await _until(lambda: len(files_in(store)) == 1)  # the first bytes are on disk, in a temporary file
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def broken() -> AsyncIterator[bytes]:
        yield data[:100]
        raise ConnectionResetError("the stream broke")

    with pytest.raises(ConnectionResetError):
        await store.upload(Upload(len(data)), broken())
    assert files_in(store) == [] and store.used_bytes == 0


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"GIF89a" + b"\0" * 100, "not a PNG, JPEG or WebP"),
        (png_claiming(100_000, 100_000), "decompression bomb"),
        (encoded(60, 48), "multiples of 8"),
        (encoded(4096, 8), "at most 2048"),
    ],
)
async def test_bytes_that_are_not_an_image_this_server_takes_keep_nothing(
    store: ImageStore, data: bytes, text: str
) -> None:
    error = await _refused(store, Upload(len(data)), _chunks(data))
    assert isinstance(error, BadImage) and error.field == DATA and text in str(error)


@pytest.mark.parametrize(
    ("upload", "field"),
    [(Upload(0), SIZE), (Upload(10, "beef"), SHA256), (Upload(10, keep_for_s=-5), KEEP_FOR)],
)
async def test_a_header_that_cannot_be_right_is_refused_before_any_byte(
    store: ImageStore, upload: Upload, field: str
) -> None:
    read: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        read.append(b"x")
        yield b"x" * 10

    error = await _refused(store, upload, chunks())
    assert error.field == field and read == []


async def test_an_upload_over_the_quota_is_refused_before_any_byte(store: ImageStore) -> None:
    read: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        read.append(b"x")
        yield b"x"

    over_limit = await _refused(store, Upload(64 * 1024 + 1), chunks())
    assert isinstance(over_limit, ImageStoreFull) and over_limit.field == SIZE and read == []


async def test_uploads_in_flight_count_against_the_quota(store: ImageStore) -> None:
    """Four 64 KiB uploads fill the 256 KiB quota while their bytes still arrive: a fifth is refused at once."""
    release = asyncio.Event()

    async def slow(data: bytes) -> AsyncIterator[bytes]:
        await release.wait()
        yield data

    data = encoded()
    uploads = [asyncio.create_task(store.upload(Upload(64 * 1024), slow(data))) for _ in range(4)]
    await _until(lambda: len(files_in(store)) == 4)  # each has its room, and its temporary file
    with pytest.raises(ImageStoreFull, match="full"):
        await store.upload(Upload(len(data)), _chunks(data))
    release.set()
    for task in uploads:  # each then ends short of its declared size: nothing kept
        with pytest.raises(BadImage):
            await task
    assert (await store.upload(Upload(len(data)), _chunks(data))).path.exists()
