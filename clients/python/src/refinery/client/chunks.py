"""Putting results that arrive as `image_chunk` events back together (the rules are in generation.proto,
`ImageChunk`): the one helper every reader of a Generate stream can use, and the one `Client` uses.

    assembler = ImageAssembler()
    for response in stub.Generate(request):
        image = assembler.feed(response)   # a whole pb.Image for `image` and for a completed run of chunks
        ...
    assembler.finish()                     # the stream ended: raises if a result is still incomplete

Anything that breaks the rules (a gap or overlap in the offsets, chunks of two results mixed, another event
in the middle of a run, a stream that ends inside one) raises `RefineryError` with DATA_LOSS: the bytes
received are not an image, and are never handed out as one.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from refinery.client.errors import RefineryError
from refinery.v1 import generation_pb2 as pb


class ImageAssembler:
    """Reassembles the results of one Generate stream. Not thread-safe: one per stream, fed in order."""

    def __init__(self) -> None:
        self._index = 0
        self._total = 0
        self._parts: list[bytes] = []
        self._received = 0
        self._open = False  # inside a run of chunks
        self._request_id = ""

    def feed(self, response: pb.GenerateResponse) -> pb.Image | None:
        """The finished result this response completes (an `image`, or the last of a run of chunks), else None."""
        self._request_id = response.request_id or self._request_id
        kind = response.WhichOneof("event")
        if kind == "image_chunk":
            return self._chunk(response.image_chunk)
        if self._open:
            self._broken(f"another event ({kind or 'unknown'}) arrived before its last chunk")
        return response.image if kind == "image" else None

    def finish(self) -> None:
        """Call when the stream ended without an error: raises if it ended inside a run of chunks."""
        if self._open:
            self._broken("the stream ended before its last chunk")

    def _chunk(self, chunk: pb.ImageChunk) -> pb.Image | None:
        if not self._open:
            self._open, self._index, self._total = True, chunk.index, chunk.total_size
            self._parts, self._received = [], 0
            if chunk.offset != 0:
                self._broken(f"its first chunk starts at offset {chunk.offset}, not 0")
        elif chunk.index != self._index:
            self._broken(f"a chunk of result {chunk.index} arrived before its last chunk")
        elif chunk.total_size != self._total:
            self._broken(f"a chunk announced {chunk.total_size} bytes in all, not {self._total}")
        elif chunk.offset != self._received:
            self._broken(f"a chunk starts at offset {chunk.offset}, not {self._received}")
        self._parts.append(chunk.data)
        self._received += len(chunk.data)
        if self._received > self._total:
            self._broken(f"{self._received} bytes arrived, more than the {self._total} announced")
        complete = self._received == self._total
        if complete != chunk.HasField("image"):
            self._broken(
                "the chunk completing it carries no image metadata"
                if complete
                else f"image metadata came after {self._received} bytes, before the end"
            )
        if not complete:
            return None
        image = pb.Image()
        image.CopyFrom(chunk.image)
        if image.data:
            self._broken("the last chunk's image metadata carries data of its own")
        if image.index != self._index:
            self._broken(f"the last chunk's image metadata is that of result {image.index}")
        image.data = b"".join(self._parts)
        self._open, self._parts = False, []
        return image

    def _broken(self, what: str) -> NoReturn:
        self._open, self._parts = False, []
        raise RefineryError(
            grpc.StatusCode.DATA_LOSS,
            f"image {self._index} arrived broken: {what} ({self._received} of {self._total} bytes received)",
            request_id=self._request_id,
        )
