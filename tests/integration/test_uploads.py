"""UploadImage through a real server on loopback (issue 18): an image sent once in pieces and named by its
reference afterwards, kept for a stated time (across restarts, with a clock the test moves), within a quota,
and every refusal keeping nothing; results kept on request."""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from modelstore import ModelStore, StoreSettings
from refinery.v1 import generation_pb2 as pb
from server.core.errors import ImageNotFound
from server.core.settings import ImageSettings
from server.images import ImageStore
from tests.images.conftest import Clock
from tests.images.pictures import encoded, png_claiming
from tests.integration.conftest import (
    TIMEOUT_S,
    ServerThread,
    bad_request_fields,
    collect,
    events,
    make_settings,
    new_stub,
)
from tests.security.conftest import ServeProcess

CHUNK = 64 * 1024  # what the clients send per message; the server takes up to 128 KiB a message
KiB, MiB = 1024, 1024 * 1024


def noise_png(width: int = 512, height: int = 512, seed: int = 0) -> bytes:
    """A PNG that does not compress (about 3 bytes a pixel): 512 x 512 is some 790 KB, thirteen messages."""
    pixels = random.Random(seed).randbytes(width * height * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def upload_messages(
    data: bytes, *, size: int | None = None, sha256: str = "", keep_for_s: int | None = None, chunk: int = CHUNK
) -> Iterator[pb.UploadImageRequest]:
    header = pb.UploadHeader(size_bytes=len(data) if size is None else size, sha256=sha256)
    if keep_for_s is not None:
        header.keep_for.CopyFrom(duration_pb2.Duration(seconds=keep_for_s))
    yield pb.UploadImageRequest(header=header)
    for offset in range(0, len(data), chunk):
        yield pb.UploadImageRequest(data=data[offset : offset + chunk])


class Uploads:
    """A server whose image store runs on the test's clock, and a client for it."""

    def __init__(self, thread: ServerThread, clock: Clock) -> None:
        self.thread = thread
        self.clock = clock
        self.images: ImageStore = thread.server.images
        self.channel = grpc.insecure_channel(thread.address)
        self.stub = new_stub(self.channel)
        self.closed = False

    def upload(self, messages: Iterator[pb.UploadImageRequest]) -> pb.UploadImageResponse:
        answer: pb.UploadImageResponse = self.stub.UploadImage(messages, timeout=TIMEOUT_S)
        return answer

    def refusal(self, messages: Iterator[pb.UploadImageRequest]) -> grpc.RpcError:
        """How an upload that must fail failed; nothing of it is stored and no temporary file is left."""
        before = self.files()
        with pytest.raises(grpc.RpcError) as caught:
            self.upload(messages)
        assert self.files() == before
        return caught.value

    def files(self) -> list[str]:
        return sorted(path.name for path in self.images.directory.iterdir())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel.close()
            self.thread.close()


@pytest.fixture
def start(store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path) -> Iterator[Callable[..., Uploads]]:
    """Start a server (nothing pinned) with an image store in the test's folder; a second start uses the same
    folder and clock, as a restarted server would."""
    clock = Clock()
    started: list[Uploads] = []

    def run(**images: Any) -> Uploads:
        image_settings = ImageSettings(directory=tmp_path / "images", **images)
        settings = make_settings(store_settings, pins=(), images=image_settings)
        store = ImageStore.from_settings(settings, clock=clock)
        server = Uploads(ServerThread(settings, store=model_store, images=store), clock)
        started.append(server)
        return server

    yield run
    for server in started:
        server.close()


def test_an_upload_in_pieces_is_stored_and_named_by_its_reference(start: Callable[..., Uploads]) -> None:
    server = start()
    data = noise_png()
    assert len(data) > 2 * 128 * KiB  # more than one request's worth: it can only arrive in pieces
    answer = server.upload(upload_messages(data, sha256=hashlib.sha256(data).hexdigest(), keep_for_s=600))
    assert answer.reference == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (answer.mime_type, answer.width, answer.height, answer.size_bytes) == ("image/png", 512, 512, len(data))
    assert answer.expires.seconds == int(server.clock.now + 600)
    stored = server.images.find(answer.reference)
    assert stored.path.read_bytes() == data and stored.path.parent == server.images.directory


def test_the_same_bytes_again_are_the_same_image_kept_longer(start: Callable[..., Uploads]) -> None:
    server = start()
    data = encoded(64, 64, "WEBP")
    first = server.upload(upload_messages(data, keep_for_s=60))
    server.clock.advance(30)
    again = server.upload(upload_messages(data))  # the server's default: an hour from now
    assert again.reference == first.reference
    assert again.expires.seconds == int(server.clock.now + 3600) > first.expires.seconds
    assert server.files() == sorted([first.reference.removeprefix("sha256:") + s for s in ("", ".json")])


def test_uploads_outlive_a_restart_within_their_time_and_not_after(start: Callable[..., Uploads]) -> None:
    server = start()
    answer = server.upload(upload_messages(encoded(128, 64, "JPEG"), keep_for_s=600))
    server.close()
    server.clock.advance(599)
    restarted = start()
    assert restarted.images.find(answer.reference).width == 128
    restarted.close()
    server.clock.advance(1)
    again = start()
    with pytest.raises(ImageNotFound):
        again.images.find(answer.reference)
    assert again.files() == []  # swept at start


def _field_of(err: grpc.RpcError) -> str:
    fields = bad_request_fields(err)
    assert len(fields) == 1, fields
    assert (err.details() or "").startswith(fields[0] + ": ")  # the message names it too
    return fields[0]


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"%PDF-1.7 not an image at all", "not a PNG, JPEG or WebP image"),
        (encoded(64, 64, "GIF"), "not a PNG, JPEG or WebP image"),
        (png_claiming(100_000, 100_000), "decompression bomb"),
        (encoded(100, 64), "multiples of 8"),
        (encoded(4096, 64), "sides of at most 2048"),
    ],
    ids=["not-an-image", "gif", "bomb", "not-multiple-of-8", "over-max-side"],
)
def test_bytes_that_are_not_an_image_the_server_takes_are_refused(
    start: Callable[..., Uploads], data: bytes, text: str
) -> None:
    err = start().refusal(upload_messages(data))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _field_of(err) == "data" and text in err.details()


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"size": 1}, "header.size_bytes", "more than the 1 bytes"),
        ({"size": 10**6}, "header.size_bytes", "ended after"),
        ({"sha256": hashlib.sha256(b"other").hexdigest()}, "header.sha256", "not the one the header declares"),
        ({"sha256": "not hex"}, "header.sha256", "64 hex digits"),
        ({"size": 0}, "header.size_bytes", "its size"),
    ],
    ids=["more-than-declared", "fewer-than-declared", "sha256-mismatch", "sha256-not-hex", "no-size"],
)
def test_a_stream_that_disagrees_with_its_header_keeps_nothing(
    start: Callable[..., Uploads], change: dict[str, Any], field: str, text: str
) -> None:
    err = start().refusal(upload_messages(encoded(), **change))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _field_of(err) == field and text in err.details()


def test_a_message_over_the_request_limit_ends_the_upload_and_keeps_nothing(start: Callable[..., Uploads]) -> None:
    """Each message is a request of its own for the 128 KiB limit: a client may send the bytes in pieces of up to
    that (64 KiB is what the clients send), and a larger piece is refused before it is buffered."""
    server = start()
    data = noise_png()
    assert server.upload(upload_messages(data, chunk=128 * KiB - 16)).size_bytes == len(data)
    before = server.files()
    with pytest.raises(grpc.RpcError) as caught:
        server.upload(upload_messages(noise_png(seed=1), chunk=200 * KiB))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (caught.value.details() or "")
    # gRPC ends the call itself, so the client may hear of it before the server has cleaned up.
    _wait_until(lambda: server.files() == before, "nothing of the refused upload is left")


def test_a_stream_without_its_header_first_is_refused(start: Callable[..., Uploads]) -> None:
    server = start()
    err = server.refusal(iter([pb.UploadImageRequest(data=encoded())]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _field_of(err) == "header"
    err = server.refusal(iter([]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _field_of(err) == "header"


def _retry_after_s(err: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def test_an_upload_over_the_quota_or_the_byte_limit_is_refused_from_its_header(
    start: Callable[..., Uploads],
) -> None:
    server = start(quota_bytes=2 * MiB, max_bytes=1 * MiB)
    first = server.upload(upload_messages(noise_png(512, 512, seed=1), keep_for_s=300))
    server.upload(upload_messages(noise_png(512, 512, seed=2), keep_for_s=900))
    third = noise_png(512, 512, seed=3)
    err = server.refusal(upload_messages(third))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _field_of(err) == "header.size_bytes"
    assert "full" in err.details() and _retry_after_s(err) == pytest.approx(300, abs=1)  # the first one's expiry
    # Declared over the limit per image: refused whatever the bytes, and no retry helps.
    err = server.refusal(upload_messages(b"", size=MiB + 1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _field_of(err) == "header.size_bytes"
    assert "per image" in err.details() and _retry_after_s(err) is None
    server.clock.advance(300)  # the first expires: its room is the third's
    assert server.upload(upload_messages(third)).reference != first.reference
    assert not server.images.directory.joinpath(first.reference.removeprefix("sha256:")).exists()


def test_a_cancelled_upload_keeps_nothing_and_leaves_no_file(start: Callable[..., Uploads]) -> None:
    server = start()
    data = noise_png()
    client_gone = threading.Event()

    def stalled() -> Iterator[pb.UploadImageRequest]:
        messages = upload_messages(data)
        yield next(messages)
        yield next(messages)
        client_gone.wait(TIMEOUT_S)  # the client stops sending, then cancels

    call = server.stub.UploadImage.future(stalled(), timeout=TIMEOUT_S)
    _wait_until(lambda: len(server.files()) == 1, "the first bytes are in a temporary file")
    call.cancel()
    client_gone.set()
    _wait_until(lambda: server.files() == [], "the temporary file is removed")
    with pytest.raises(ImageNotFound):
        server.images.find("sha256:" + hashlib.sha256(data).hexdigest())


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S  # a hang fails the test; never an expectation about speed
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_kept_results_are_named_by_a_reference_and_found_again(start: Callable[..., Uploads]) -> None:
    server = start()
    request = pb.GenerateRequest(positive_prompt="a red cube", width=64, height=64, steps=2, number_results=2)
    request.keep_results.CopyFrom(duration_pb2.Duration(seconds=900))
    images = events(collect(server.stub, request), "image")
    assert len(images) == 2
    for image in images:
        assert image.reference == "sha256:" + hashlib.sha256(image.data).hexdigest()
        assert image.reference_expires.seconds == int(server.clock.now + 900)
        assert server.images.find(image.reference).path.read_bytes() == image.data
    # Without keep_results nothing is stored.
    before = server.files()
    plain = events(
        collect(server.stub, pb.GenerateRequest(positive_prompt="a cube", width=64, height=64, steps=2)), "image"
    )
    assert [image.reference for image in plain] == [""] and server.files() == before


def test_a_decompression_bomb_costs_the_server_no_memory(store_settings: StoreSettings, tmp_path: Path) -> None:
    """`refinery serve` in a process of its own, so that its memory is its own: a 100000 x 100000 PNG claim
    (30 GB of pixels in 100 bytes) is refused from its header, naming the field, and the server's resident
    memory, now and at its peak, stays where it was."""
    server = ServeProcess(
        "--pin", "none", "--devices", "cpu", "--images-dir", str(tmp_path / "images"),
        cache=store_settings.cache_dir, cwd=tmp_path,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = new_stub(channel)
            stub.UploadImage(upload_messages(encoded(64, 64)), timeout=TIMEOUT_S)  # Pillow's PNG reader loaded
            resident, peak = server.memory("VmRSS"), server.memory("VmHWM")
            with pytest.raises(grpc.RpcError) as caught:
                stub.UploadImage(upload_messages(png_claiming(100_000, 100_000)), timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _field_of(caught.value) == "data" and "decompression bomb" in caught.value.details()
            assert server.memory("VmHWM") - peak < 8 * MiB
            assert server.memory("VmRSS") - resident < 8 * MiB
    finally:
        server.kill()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        [hashlib.sha256(encoded(64, 64)).hexdigest() + s for s in ("", ".json")]
    )
