"""UploadImage needs the generation token, like Generate (issue 18): the access gate checks a stream of requests
from its metadata before its first message is read, so a refused upload stores nothing, and a message that is not
protobuf ends the call with INVALID_ARGUMENT, as for every other method."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import grpc
import pytest

from refinery.v1 import generation_pb2 as pb
from refinery.v1 import generation_pb2_grpc as pb_grpc
from server.core.errors import ImageNotFound
from tests.images.pictures import encoded
from tests.integration.conftest import ServerThread

from .conftest import ADMIN_TOKEN, TIMEOUT_S, TOKEN

DATA = encoded(64, 64, "PNG", color="purple")
REFERENCE = "sha256:" + hashlib.sha256(DATA).hexdigest()


def _messages() -> Iterator[pb.UploadImageRequest]:
    yield pb.UploadImageRequest(header=pb.UploadHeader(size_bytes=len(DATA)))
    yield pb.UploadImageRequest(data=DATA)


def _upload(channel: grpc.Channel, token: str | None, messages: Iterator[pb.UploadImageRequest]) -> grpc.StatusCode:
    stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    try:
        stub.UploadImage(messages, metadata=metadata, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _stored(server: ServerThread) -> list[str]:
    return sorted(path.name for path in server.server.images.directory.iterdir())


def _forget(server: ServerThread) -> None:
    """The test's image is not in the store (another test of the session's cache may have left it there)."""
    images = server.server.images
    for name in (REFERENCE.removeprefix("sha256:"), REFERENCE.removeprefix("sha256:") + ".json"):
        images.directory.joinpath(name).unlink(missing_ok=True)


def test_an_upload_without_the_generation_token_is_refused_and_stores_nothing(guarded: ServerThread) -> None:
    _forget(guarded)
    before = _stored(guarded)
    with grpc.insecure_channel(guarded.address) as channel:
        assert _upload(channel, None, _messages()) == grpc.StatusCode.UNAUTHENTICATED
        assert _upload(channel, "guess-0b1c2d3e4f5a6b7c8d", _messages()) == grpc.StatusCode.UNAUTHENTICATED
        assert _stored(guarded) == before
        with pytest.raises(ImageNotFound):
            guarded.server.images.find(REFERENCE)
        assert _upload(channel, TOKEN, _messages()) == grpc.StatusCode.OK
        assert _upload(channel, ADMIN_TOKEN, _messages()) == grpc.StatusCode.OK  # the admin token does everything
    assert guarded.server.images.find(REFERENCE).path.read_bytes() == DATA


def test_an_upload_is_refused_before_its_first_message_is_read(guarded: ServerThread) -> None:
    """A client that sends nothing at all is refused all the same: the refusal comes from the call's metadata,
    not from anything the stream carries."""
    hold = threading.Event()
    sent: list[pb.UploadImageRequest] = []

    def nothing_yet() -> Iterator[pb.UploadImageRequest]:
        hold.wait(TIMEOUT_S)
        for message in _messages():
            sent.append(message)
            yield message

    try:
        with grpc.insecure_channel(guarded.address) as channel:
            assert _upload(channel, None, nothing_yet()) == grpc.StatusCode.UNAUTHENTICATED
            assert sent == []
    finally:
        hold.set()


def test_a_message_of_an_upload_that_is_not_protobuf_is_invalid_argument(guarded: ServerThread) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        upload = channel.stream_unary("/refinery.v1.GenerationService/UploadImage")
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        with pytest.raises(grpc.RpcError) as caught:
            upload(iter([b"\xff\xff\xff\xff"]), metadata=metadata, timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "the request is not a valid UploadImageRequest"
