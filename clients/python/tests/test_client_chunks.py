"""ImageAssembler on hand-built response sequences: results sent in chunks come back whole, and every way a
chunk stream can break is an error, never an image."""

from __future__ import annotations

import os

import grpc
import pytest

from refinery.client import ImageAssembler, RefineryError
from refinery.v1 import generation_pb2 as pb

MiB = 1 << 20


def meta(index: int, **fields: object) -> pb.Image:
    return pb.Image(index=index, mime_type="image/png", seed=7 + index, width=2048, height=2048, **fields)


def chunked(index: int, data: bytes, piece: int = 3 * MiB) -> list[pb.GenerateResponse]:
    """A result as the server sends it when it is over 3 MiB: consecutive chunks, metadata on the last."""
    out = []
    for offset in range(0, len(data), piece):
        chunk = pb.ImageChunk(index=index, offset=offset, total_size=len(data), data=data[offset : offset + piece])
        if offset + piece >= len(data):
            chunk.image.CopyFrom(meta(index))
        out.append(pb.GenerateResponse(request_id="r", image_chunk=chunk))
    return out


def progress() -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id="r", progress=pb.Progress(stage=pb.STAGE_BASE, step=1))


def feed_all(responses: list[pb.GenerateResponse]) -> list[pb.Image]:
    assembler = ImageAssembler()
    images = [image for r in responses if (image := assembler.feed(r)) is not None]
    assembler.finish()
    return images


def test_results_in_chunks_come_back_whole_beside_whole_ones() -> None:
    big = os.urandom(7 * MiB + 123)
    small = os.urandom(1000)
    whole = pb.GenerateResponse(request_id="r", image=meta(1, data=small))
    images = feed_all([progress(), *chunked(0, big), whole, *chunked(2, big[::-1], piece=MiB)])
    assert [(i.index, i.data, i.seed, i.width) for i in images] == [
        (0, big, 7, 2048),
        (1, small, 8, 2048),
        (2, big[::-1], 9, 2048),
    ]


def test_other_events_pass_through_as_none() -> None:
    assembler = ImageAssembler()
    assert assembler.feed(progress()) is None
    assert assembler.feed(pb.GenerateResponse(request_id="r", queued=pb.Queued(position=0))) is None


def _swap(responses: list[pb.GenerateResponse], i: int, j: int) -> list[pb.GenerateResponse]:
    responses[i], responses[j] = responses[j], responses[i]
    return responses


def _edit(responses: list[pb.GenerateResponse], i: int, **fields: object) -> list[pb.GenerateResponse]:
    for name, value in fields.items():
        if name == "image":
            responses[i].image_chunk.image.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(responses[i].image_chunk, name, value)
    return responses


def _clear_last(responses: list[pb.GenerateResponse]) -> list[pb.GenerateResponse]:
    responses[-1].image_chunk.ClearField("image")
    return responses


DATA = bytes(range(256)) * (40 * 1024)  # 10 MiB: four chunks of at most 3 MiB
BROKEN = {
    "truncated": (lambda: chunked(0, DATA)[:-1], "the stream ended before its last chunk"),
    "another event inside": (
        lambda: [*chunked(0, DATA)[:2], progress(), *chunked(0, DATA)[2:]],
        "another event (progress) arrived before its last chunk",
    ),
    "a whole image inside": (
        lambda: [*chunked(0, DATA)[:2], pb.GenerateResponse(image=meta(1, data=b"x")), *chunked(0, DATA)[2:]],
        "another event (image) arrived before its last chunk",
    ),
    "two results interleaved": (
        lambda: [chunked(0, DATA)[0], chunked(1, DATA)[0], *chunked(0, DATA)[1:], *chunked(1, DATA)[1:]],
        "a chunk of result 1 arrived before its last chunk",
    ),
    "out of order": (lambda: _swap(chunked(0, DATA), 1, 2), "a chunk starts at offset 6291456, not 3145728"),
    "a chunk lost": (lambda: [c for i, c in enumerate(chunked(0, DATA)) if i != 1], "not 3145728"),
    "not starting at 0": (lambda: chunked(0, DATA)[1:], "its first chunk starts at offset 3145728, not 0"),
    "size changes": (lambda: _edit(chunked(0, DATA), 2, total_size=len(DATA) + 1), "not 10485760"),
    "more than announced": (lambda: _edit(chunked(0, DATA), 3, data=b"x" * (2 * MiB)), "more than the 10485760"),
    "metadata early": (lambda: _edit(chunked(0, DATA), 1, image=meta(0)), "metadata came after 6291456 bytes"),
    "no metadata": (lambda: _clear_last(chunked(0, DATA)), "the chunk completing it carries no image metadata"),
    "metadata of another result": (lambda: _edit(chunked(0, DATA), 3, image=meta(4)), "that of result 4"),
    "metadata with data": (lambda: _edit(chunked(0, DATA), 3, image=meta(0, data=b"x")), "data of its own"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_chunk_stream_is_an_error_never_an_image(case: str) -> None:
    build, reason = BROKEN[case]
    responses = build()
    assembler = ImageAssembler()
    images = []
    with pytest.raises(RefineryError) as caught:
        for response in responses:
            if (image := assembler.feed(response)) is not None:
                images.append(image)
        assembler.finish()
    assert caught.value.code is grpc.StatusCode.DATA_LOSS
    assert reason in caught.value.message
    assert images == []  # nothing handed out: the error comes before any part of the broken result


def test_the_error_names_the_result_and_how_far_it_got() -> None:
    with pytest.raises(RefineryError) as caught:
        feed_all(chunked(3, DATA)[:2])
    assert str(caught.value) == (
        "DATA_LOSS: image 3 arrived broken: the stream ended before its last chunk (6291456 of 10485760 bytes received)"
    )
    assert caught.value.request_id == "r"
