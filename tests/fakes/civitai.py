"""A fake civitai API and a SEPARATE fake storage host (another port), shaped like the real ones
(shared/research/modelstore.md §2): model-version JSON, a download endpoint that 307-redirects to presigned
storage URLs, JSON error bodies, and storage that honours Range, expires links, and refuses requests that
carry an Authorization header (as R2 does)."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tests.fakes.server import FakeServer, Handler, Seen, serve_range

_AMZ_SIGNATURE = "X-Amz-Signature"


@dataclass
class StoredObject:
    data: bytes
    disposition_name: str = "model.safetensors"
    # Drop the connection at this absolute offset, for the first `cut_times` requests (None: always).
    cut_at: int | None = None
    cut_times: int | None = None
    ignore_range: bool = False
    # Once `hold_after` bytes of a response are out, wait for `release` before sending more.
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    trickle_s: float = 0.0  # pause between chunks (a slow link)


class FakeStorage(FakeServer):
    """Presigned-URL object storage (R2/B2-like) on its own port."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, StoredObject] = {}
        self._signatures: dict[str, tuple[str, int | None]] = {}
        self._lock = threading.Lock()
        self.sign_uses: int | None = None  # how many requests each new link serves before it "expires"
        self.extra_query = ""  # appended to every signed link (e.g. a credential under an innocent name)
        self.signature_param = _AMZ_SIGNATURE

    def sign(self, name: str) -> str:
        signature = uuid.uuid4().hex
        with self._lock:
            self._signatures[signature] = (name, self.sign_uses)
        if self.signature_param != _AMZ_SIGNATURE:  # a storage host whose parameter names give nothing away
            return f"{self.url}/bucket/{name}?{self.signature_param}={signature}{self.extra_query}"
        disposition = quote(f'attachment; filename="{self.objects[name].disposition_name}"', safe="")
        return (
            f"{self.url}/bucket/{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAFAKE%2F20260101"
            f"&X-Amz-Expires=86400&X-Amz-Signature={signature}&response-content-disposition={disposition}"
            f"{self.extra_query}"
        )

    def expire_all(self) -> None:
        with self._lock:
            self._signatures.clear()

    def gets(self) -> list[Seen]:
        return self.seen("GET", "/bucket/")

    def handle(self, handler: Handler, request: Seen) -> None:
        if "authorization" in request.headers:
            # R2 and B2 answer 400 to a presigned URL that also carries an Authorization header.
            handler.send_body(400, b"<Error><Code>InvalidRequest</Code></Error>", {"Content-Type": "application/xml"})
            return
        name = request.path.removeprefix("/bucket/")
        signature = request.query.get(self.signature_param, "")
        with self._lock:
            grant = self._signatures.get(signature)
            if grant is not None and grant[1] is not None:
                uses = grant[1] - 1
                if uses <= 0:
                    del self._signatures[signature]
                else:
                    self._signatures[signature] = (grant[0], uses)
        if grant is None or grant[0] != name or name not in self.objects:
            body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            handler.send_body(403, body, {"Content-Type": "application/xml"})
            return
        obj = self.objects[name]
        cut_at = obj.cut_at
        if cut_at is not None and obj.cut_times is not None:
            with self._lock:
                if obj.cut_times > 0:
                    obj.cut_times -= 1
                else:
                    cut_at = None
        start = int(handler.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0] or 0)

        def before_chunk(offset: int) -> None:
            if obj.hold_after is not None and offset - start >= obj.hold_after:
                obj.release.wait(timeout=60)
            if obj.trickle_s:
                time.sleep(obj.trickle_s)

        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{obj.disposition_name}"',
            "ETag": f'"{hashlib.md5(obj.data, usedforsecurity=False).hexdigest()}"',
        }
        serve_range(
            handler,
            obj.data,
            headers,
            ignore_range=obj.ignore_range,
            cut_at=cut_at,
            before_chunk=before_chunk,
        )


@dataclass
class FakeFile:
    id: int
    name: str
    type: str = "Model"
    format: str = "SafeTensor"
    size: str = "pruned"
    fp: str = "fp16"
    primary: bool = False
    object: str = ""  # the storage object holding its bytes
    sha256: str = ""  # published hash (defaults to the real one)
    size_kb: float | None = None


class FakeCivitai(FakeServer):
    """civitai's REST API: `/api/v1/model-versions/{id}` and `/api/download/models/{id}`."""

    def __init__(self, storage: FakeStorage, *, token: str | None = None) -> None:
        super().__init__()
        self.storage = storage
        self.token = token
        self.versions: dict[int, dict[str, Any]] = {}
        self.files: dict[int, FakeFile] = {}
        self.require_auth: set[int] = set()
        # version id -> (status, JSON body, headers) answered by the download endpoint instead of a redirect
        self.download_errors: dict[int, tuple[int, Any, dict[str, str]]] = {}

    def add_version(
        self,
        model_id: int,
        version_id: int,
        files: list[tuple[FakeFile, bytes]],
        *,
        model_type: str = "Checkpoint",
        base_model_type: str = "Standard",
    ) -> None:
        entries = []
        for file, data in files:
            file.object = file.object or f"{version_id}-{file.id}"
            self.storage.objects[file.object] = StoredObject(data, disposition_name=file.name)
            self.files[file.id] = file
            entries.append(
                {
                    "id": file.id,
                    "name": file.name,
                    "type": file.type,
                    "sizeKB": file.size_kb if file.size_kb is not None else round(len(data) / 1024, 2),
                    "metadata": {"format": file.format, "size": file.size, "fp": file.fp},
                    "pickleScanResult": "Success",
                    "virusScanResult": "Success",
                    "hashes": {
                        "AutoV2": "A5F58EB1C3",
                        "SHA256": (file.sha256 or hashlib.sha256(data).hexdigest()).upper(),
                        "CRC32": "DAEE95B7",
                    },
                    "downloadUrl": f"{self.url}/api/download/models/{version_id}",
                    "primary": file.primary,
                }
            )
        self.versions[version_id] = {
            "id": version_id,
            "modelId": model_id,
            "name": "1.0",
            "baseModel": "SDXL 1.0",
            "baseModelType": base_model_type,
            "air": f"urn:air:sdxl:checkpoint:civitai:{model_id}@{version_id}",
            "status": "Published",
            "model": {"name": "Fake SDXL", "type": model_type, "nsfw": False, "poi": False},
            "files": entries,
            "downloadUrl": f"{self.url}/api/download/models/{version_id}",
        }

    def object_of(self, version_id: int, file_id: int) -> StoredObject:
        return self.storage.objects[self.files[file_id].object]

    def downloads(self) -> list[Seen]:
        return self.seen("GET", "/api/download/models/")

    def handle(self, handler: Handler, request: Seen) -> None:
        if request.path.startswith("/api/v1/model-versions/"):
            version = self.versions.get(int(request.path.rsplit("/", 1)[1]))
            if version is None:
                handler.send_json(404, {"error": "Model not found"})
            else:
                handler.send_json(200, version)
            return
        if not request.path.startswith("/api/download/models/"):
            handler.send_json(404, {"error": "Not found"})
            return
        if "token" in request.query:
            handler.send_json(400, {"error": "this fake refuses ?token=: tokens in URLs leak into logs"})
            return
        version_id = int(request.path.rsplit("/", 1)[1])
        if version_id in self.download_errors:
            status, body, headers = self.download_errors[version_id]
            handler.send_json(status, body, headers)
            return
        if version_id in self.require_auth and request.headers.get("authorization") != f"Bearer {self.token}":
            handler.send_json(
                401,
                {
                    "error": "Unauthorized",
                    "message": "The creator of this asset requires you to be logged in to download it",
                },
            )
            return
        version = self.versions.get(version_id)
        if version is None:
            handler.send_json(404, {"error": "File not found"})
            return
        wanted = request.query.get("fileId")
        entries = version["files"]
        entry = next((f for f in entries if str(f["id"]) == wanted), None) if wanted else None
        if entry is None and wanted is None:
            entry = next((f for f in entries if f["primary"]), None)  # what civitai does without fileId
        if entry is None:
            handler.send_json(404, {"error": "File not found"})
            return
        location = self.storage.sign(self.files[entry["id"]].object)
        handler.send_body(307, b"", {"Location": location, "Cache-Control": "no-store, max-age=0"})
