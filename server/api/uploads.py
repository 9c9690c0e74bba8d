"""UploadImage: a client-streaming call that stores one image in the image store and answers its reference.

The stream is the header (`UploadHeader`: size, optional sha256, time to keep) and then the bytes in messages
of any size up to the server's request limit (`Settings.max_request_bytes`, 128 KiB a message: 64 KiB of data a
message is what the clients send). Each message's bytes go to disk as they arrive (`ImageStore.upload`); the
server never holds more than one message of them. Errors name the request field: `header` (no header first, or
a second one), `header.size_bytes`, `header.sha256`, `header.keep_for`, `data` (what the bytes are).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from refinery.v1 import generation_pb2 as pb
from server.api.convert import timestamp
from server.core.errors import BadImage, ImageError
from server.images import DATA, KEEP_FOR, SHA256, SIZE, ImageStore, Upload

# The store names the part of an upload an error concerns; the request spells it so.
_FIELDS = {SIZE: "header.size_bytes", SHA256: "header.sha256", KEEP_FOR: "header.keep_for", DATA: "data"}


async def upload_image(store: ImageStore, requests: AsyncIterator[pb.UploadImageRequest]) -> pb.UploadImageResponse:
    """Store the image the stream `requests` carries. Raises ImageError naming its field; a stream that ends
    early, breaks or is cancelled raises too, and in every such case nothing is kept."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("part") != "header":
        raise BadImage("the first message of an upload must be its header", "header")
    header = first.header
    keep_for_s = header.keep_for.ToTimedelta().total_seconds() if header.HasField("keep_for") else None
    upload = Upload(size_bytes=header.size_bytes, sha256=header.sha256, keep_for_s=keep_for_s)
    try:
        image = await store.upload(upload, _data(requests))
    except ImageError as exc:
        raise exc.at(_FIELDS.get(exc.field, exc.field)) from None
    return pb.UploadImageResponse(
        reference=image.reference,
        mime_type=image.mime_type,
        width=image.width,
        height=image.height,
        size_bytes=upload.size_bytes,
        expires=timestamp(image.expires_at),
    )


async def _data(requests: AsyncIterator[pb.UploadImageRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        part = request.WhichOneof("part")
        if part == "header":
            raise BadImage("an upload has one header, its first message", "header")
        if part == "data":
            yield request.data
