"""The image store's front door: input images and kept results by content hash on the cache volume.

    store = ImageStore.from_settings(settings)
    image = store.find("sha256:...")                 # ImageNotFound when not stored or expired
    image = store.put_bytes(data, keep_for_s=600)    # inline images, kept results (blocking)
    image = await store.upload(Upload(size), chunks) # UploadImage: bytes to disk as they arrive
    with store.hold([image]): ...                    # kept on disk for a running request

Other rooms use only what this module names; `server.api` is its one caller, `server.app` builds it.
"""

from server.images.header import ImageHeader, ImageLimits, read_header
from server.images.store import REFERENCE_PREFIX, ImageStore, StoreLimits, digest_of
from server.images.upload import DATA, KEEP_FOR, SHA256, SIZE, Upload

__all__ = [
    "DATA",
    "KEEP_FOR",
    "REFERENCE_PREFIX",
    "SHA256",
    "SIZE",
    "ImageHeader",
    "ImageLimits",
    "ImageStore",
    "StoreLimits",
    "Upload",
    "digest_of",
    "read_header",
]
