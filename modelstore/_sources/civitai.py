"""civitai: checkpoints and LoRAs named `civitai:MODEL@VERSION[+FILE]` (shared/research/modelstore.md §2).

- Metadata: `GET {api}/api/v1/model-versions/{VERSION}`; its `modelId` must be MODEL.
- The file is chosen here, deterministically, never left to civitai's `primary` flag (which depends on the
  account's preferences and has handed out the VAE, civitai/civitai#523): `+FILE` pins one; otherwise the
  `Model` / `Pruned Model` files in SafeTensor format, preferring pruned over full, then fp16, then the lowest
  file id. A VAE or any other component is never picked; a version that offers only pickles is refused before
  anything is downloaded. A LoRA version (model type `LORA`) is chosen from its `Model` files alike, and the
  words it was trained on (`trainedWords`) are kept with it; every other model type (VAE, embedding, ...) is
  refused.
- Bytes: `GET {api}/api/download/models/{VERSION}?fileId={FILE}` with `Authorization: Bearer` (only to the
  configured API host, never as `?token=`), which answers 307 to presigned storage. The redirect is followed
  by the downloader WITHOUT the Authorization header (storage must not see the token, and R2/B2 refuse
  requests that carry one). When storage says the link expired, the downloader calls `locate` again for a
  fresh one.
- Errors: 401/403/404/410/429 become SourceUnauthenticated / SourcePermissionDenied / ModelNotFound /
  ModelNotFound / SourceRateLimited(retry_after), carrying civitai's own `error`/`message` text.
- The server's file name (`files[].name`, Content-Disposition) is metadata only, never used as a path.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin

import requests

from modelstore._http import TRANSPORT_ERRORS, describe, get, origin, read_capped, response_error
from modelstore._redact import url_for_log
from modelstore._remote import Location, RemoteFile
from modelstore._sources import RemotePlan
from modelstore.air import AIR
from modelstore.errors import (
    IntegrityError,
    ModelNotFound,
    ModelStoreError,
    SourceUnavailable,
    UnsafeCheckpoint,
    WrongArchitecture,
)
from modelstore.record import Layout

log = logging.getLogger(__name__)

SOURCE = "civitai"
TOKEN_HINT = "CIVITAI_TOKEN"
_CHECKPOINT_FILE_TYPES = ("Model", "Pruned Model")
# civitai's model types the store keeps, and which of a version's files are the weights for each.
_FILE_TYPES = {"Checkpoint": _CHECKPOINT_FILE_TYPES, "LORA": ("Model",)}
_MAX_TRIGGER_WORDS = 64
_SAFETENSOR = "SafeTensor"
_SIZE_PREFERENCE = {"pruned": 0, "full": 1}
_FP_PREFERENCE = {"fp16": 0, "bf16": 1, "fp32": 2}
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_MAX_METADATA_BYTES = 8 * 1024 * 1024


class CivitaiSource:
    name = SOURCE

    def __init__(self, api: str, token: str | None, session: requests.Session) -> None:
        self._api = api.rstrip("/")
        self._token = token
        self._session = session
        self._api_origin = origin(self._api)

    def plan(self, air: AIR) -> RemotePlan:
        assert air.version is not None  # parse_air guarantees a numeric version for civitai
        version = self._version(air.version)
        model_id = version.get("modelId")
        if str(model_id) != air.id:
            raise ModelNotFound(
                f"civitai model version {air.version} belongs to model {model_id}, not {air.id} "
                f"(use civitai:{model_id}@{air.version})"
            )
        model = _dict(version.get("model"))
        model_type = model.get("type")
        if model_type is not None and model_type not in _FILE_TYPES:
            raise WrongArchitecture(
                f"{air.canonical} is a {model_type}, not a checkpoint or a LoRA",
                expected="a checkpoint or a LoRA",
                found=str(model_type),
            )
        chosen = choose_file(version, air, _FILE_TYPES.get(str(model_type), _CHECKPOINT_FILE_TYPES))
        file_id = str(chosen["id"])
        sha256 = _sha256_of(chosen, air)
        approx = _approx_size(chosen, air)
        remote = RemoteFile(
            path="model.safetensors",
            label=f"civitai:{air.id}@{air.version}+{file_id}",
            locate=functools.partial(self._locate, air.version, file_id),
            approx_size=approx,
            sha256=sha256,
            source=SOURCE,
            token_hint=TOKEN_HINT,
        )
        meta = _dict(chosen.get("metadata"))
        metadata = {
            "source": SOURCE,
            "modelId": air.id,
            "versionId": air.version,
            "fileId": file_id,
            "fileName": _text(chosen.get("name")),  # what civitai calls it: metadata only, never a path
            "fileType": _text(chosen.get("type")),
            "format": _text(meta.get("format")),
            "fp": _text(meta.get("fp")),
            "size": _text(meta.get("size")),
            "sizeKB": chosen.get("sizeKB"),
            "sha256": sha256,
            "modelName": _text(model.get("name")),
            "modelType": _text(model_type),
            "versionName": _text(version.get("name")),
            "baseModel": _text(version.get("baseModel")),
            "baseModelType": _text(version.get("baseModelType")),
            "air": _text(version.get("air")),
        }
        if model_type == "LORA":
            metadata["triggerWords"] = trigger_words(version)
        return RemotePlan(air, Layout.SINGLE_FILE, (remote,), metadata)

    def _version(self, version_id: str) -> Mapping[str, Any]:
        url = f"{self._api}/api/v1/model-versions/{version_id}"
        what = f"civitai model version {version_id}"
        try:
            with get(self._session, url, self._auth(url)) as response:
                if response.status_code != 200:
                    raise self._error(response, what)
                body = read_capped(response, _MAX_METADATA_BYTES + 1)
        except TRANSPORT_ERRORS as exc:
            raise SourceUnavailable(f"civitai could not be reached for {what} ({self._describe(exc)})") from None
        if len(body) > _MAX_METADATA_BYTES:
            raise SourceUnavailable(f"civitai sent an implausibly large description of {what}")
        try:
            document = json.loads(body)
        except ValueError:
            raise SourceUnavailable(f"civitai sent something other than JSON for {what}") from None
        if not isinstance(document, dict):
            raise SourceUnavailable(f"civitai sent an unexpected description of {what}")
        return document

    def _locate(self, version_id: str, file_id: str) -> Location:
        """Ask civitai where the file's bytes are right now (a fresh presigned URL each time)."""
        url = f"{self._api}/api/download/models/{version_id}?fileId={file_id}"
        what = f"civitai:{version_id}+{file_id}"
        headers = self._auth(url)
        try:
            # Streamed and not followed: a server that answers with the bytes themselves is not read here.
            with get(self._session, url, headers) as response:
                if response.is_redirect:
                    target = urljoin(url, response.headers["Location"])
                    log.info("civitai:%s+%s is at %s", version_id, file_id, url_for_log(target))
                    # No Authorization here: the token stays with civitai, whatever host storage is.
                    return Location(target, {}, expiring=True)
                if response.status_code == 200:
                    return Location(url, headers)  # a mirror that serves the bytes itself
                raise self._error(response, what)
        except TRANSPORT_ERRORS as exc:
            raise SourceUnavailable(f"civitai could not be reached for {what} ({self._describe(exc)})") from None

    def _auth(self, url: str) -> dict[str, str]:
        """The Authorization header, only for the configured API host itself (scheme, host and port)."""
        if self._token and origin(url) == self._api_origin:
            return {"Authorization": f"Bearer {self._token}"}
        return {}

    def _error(self, response: requests.Response, what: str) -> ModelStoreError:
        return response_error(response, what=what, source=SOURCE, token_hint=TOKEN_HINT, secrets=(self._token,))

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, (self._token,))


def trigger_words(version: Mapping[str, Any]) -> list[str]:
    """A LoRA version's `trainedWords`: strings only, bounded (they are shown and stored, never trusted)."""
    words = version.get("trainedWords")
    if not isinstance(words, list):
        return []
    return [w.strip()[:200] for w in words if isinstance(w, str) and w.strip()][:_MAX_TRIGGER_WORDS]


def choose_file(
    version: Mapping[str, Any], air: AIR, weights: tuple[str, ...] = _CHECKPOINT_FILE_TYPES
) -> Mapping[str, Any]:
    """The one file of `version` that `air` means (see the module docstring for the rule), among files of the
    types in `weights`."""
    files = [f for f in version.get("files") or [] if isinstance(f, dict) and "id" in f]
    where = f"civitai model version {air.version}"
    if not files:
        raise ModelNotFound(f"{where} has no downloadable files (archived or not published?)")
    if air.file is not None:
        pinned = [f for f in files if str(f["id"]) == air.file]
        if not pinned:
            raise ModelNotFound(f"file {air.file} is not part of {where}")
        chosen = pinned[0]
        if chosen.get("type") not in weights:
            found = _text(chosen.get("type")) or "unknown"
            raise WrongArchitecture(
                f"civitai file {air.file} is a {found} file, not a checkpoint",
                expected="a checkpoint file",
                found=found,
            )
        if _format(chosen) != _SAFETENSOR:
            raise UnsafeCheckpoint(
                f"civitai file {air.file} is {_format(chosen) or 'of unknown format'}; only SafeTensor files "
                "are downloaded"
            )
        return chosen
    checkpoints = [f for f in files if f.get("type") in weights]
    if not checkpoints:
        kinds = ", ".join(sorted({_text(f.get("type")) or "unknown" for f in files}))
        raise ModelNotFound(f"{where} has no checkpoint file (only: {kinds})")
    safe = [f for f in checkpoints if _format(f) == _SAFETENSOR]
    if not safe:
        formats = ", ".join(sorted({_format(f) or "unknown" for f in checkpoints}))
        raise UnsafeCheckpoint(f"{where} offers its checkpoint only as {formats}; only SafeTensor files are downloaded")
    return min(safe, key=_preference)


def _preference(file: Mapping[str, Any]) -> tuple[int, int, int, int]:
    meta = _dict(file.get("metadata"))
    file_id = int(file["id"]) if str(file["id"]).isdigit() else sys.maxsize
    return (
        _SIZE_PREFERENCE.get(str(meta.get("size")), 2),
        _FP_PREFERENCE.get(str(meta.get("fp")), 3),
        _CHECKPOINT_FILE_TYPES.index(file["type"]),
        file_id,
    )


def _format(file: Mapping[str, Any]) -> str | None:
    meta = file.get("metadata")
    return _text(meta.get("format")) if isinstance(meta, dict) else None


def _sha256_of(file: Mapping[str, Any], air: AIR) -> str:
    hashes = _dict(file.get("hashes"))
    value = next((v for k, v in hashes.items() if str(k).upper() == "SHA256"), None)
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise IntegrityError(
            f"civitai publishes no SHA256 for file {file['id']} of {air.canonical}: it cannot be verified, "
            "so it is not downloaded"
        )
    return value.lower()  # civitai's hashes are upper-case hex


def _approx_size(file: Mapping[str, Any], air: AIR) -> int:
    size_kb = file.get("sizeKB")
    if not isinstance(size_kb, (int, float)) or size_kb <= 0:
        raise IntegrityError(f"civitai publishes no size for file {file['id']} of {air.canonical}")
    return round(size_kb * 1024)


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) else None
