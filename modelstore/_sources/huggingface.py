"""Hugging Face: `hf:owner/repo[@revision]` (a diffusers-format repository) and
`hf:owner/repo[@revision]+path/file.safetensors` (one single-file checkpoint in a repository).

huggingface_hub does the talking to the Hub: the revision becomes a commit (`model_info`), and the file list
of that commit comes with sizes and, for LFS files, their SHA256 (`list_repo_tree`). The bytes then go through
the store's own downloader, like civitai's: huggingface_hub checks only sizes and no longer resumes across
calls or processes (modelstore.md §3.3, §3.5), while this store verifies every file's hash as it streams and
resumes after a restart. Each file's URL is `hf_hub_url` at the pinned commit; the token goes with it only to
the Hub's own origin: the downloader drops it when the Hub redirects to its CDN.

From a diffusers repository only what an SDXL pipeline needs is fetched: model_index.json, and in the
scheduler, tokenizer(s), text encoder(s), UNet and VAE folders their JSON/text configs and safetensors
weights, the fp16 variant where there is one. A variant file is placed under the plain name
(`unet/diffusion_pytorch_model.fp16.safetensors` becomes `unet/diffusion_pytorch_model.safetensors` in the
model folder), so the loader opens any cached folder the same way, with no `variant=`. Pickled weights (.bin,
.ckpt) are never fetched."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from modelstore._http import describe, error_for_status
from modelstore._remote import Location, RemoteFile
from modelstore._sources import RemotePlan
from modelstore.air import AIR
from modelstore.errors import (
    ModelNotFound,
    ModelStoreError,
    SourcePermissionDenied,
    SourceUnauthenticated,
    SourceUnavailable,
    UnsafeCheckpoint,
)
from modelstore.record import Layout

log = logging.getLogger(__name__)

SOURCE = "Hugging Face"
TOKEN_HINT = "HF_TOKEN"
COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae")
_WEIGHTED = {"text_encoder", "text_encoder_2", "unet", "vae"}
_STEMS = ("diffusion_pytorch_model", "model")
_SHARD = r"-\d{5}-of-\d{5}\.safetensors"
# Transport failures (refused, timed out) come as the HTTP library's own HTTPError: httpx in huggingface_hub
# 1.x, httpx2 in 2.x. HfHubHTTPError derives from it, which names it without importing either.
_TRANSPORT_ERROR: type[Exception] = next(
    base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError" and issubclass(base, Exception)
)


@dataclass(frozen=True)
class HubFile:
    """One file of a repository at a commit, as the Hub lists it."""

    path: str
    size: int
    sha256: str | None
    git_sha1: str


class HuggingFaceSource:
    name = SOURCE

    def __init__(self, endpoint: str, token: str | None) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._token = token
        # token=False: never fall back to a token huggingface_hub finds on its own (~/.cache, HF_TOKEN);
        # credentials come only through StoreSettings.
        self._api = HfApi(endpoint=self._endpoint, token=token or False, library_name="refinery")

    def plan(self, air: AIR) -> RemotePlan:
        revision = air.version or "main"
        commit, entries = self._listing(air, revision)
        by_path = {e.path: e for e in entries}
        if air.file is not None:
            entry = by_path.get(air.file)
            if entry is None:
                raise ModelNotFound(f"{air.file} is not in {air.id}@{revision} on {SOURCE}")
            chosen = {"model.safetensors": entry}
            layout = Layout.SINGLE_FILE
        else:
            chosen = select_diffusers_files(air, by_path)
            layout = Layout.DIFFUSERS
        files = tuple(self._remote(air, commit, target, entry) for target, entry in sorted(chosen.items()))
        metadata = {
            "source": "huggingface",
            "repo": air.id,
            "revision": revision,
            "commit": commit,
            "files": {target: entry.path for target, entry in sorted(chosen.items())},
        }
        return RemotePlan(air, layout, files, metadata)

    def _listing(self, air: AIR, revision: str) -> tuple[str, list[HubFile]]:
        try:
            commit = self._api.model_info(air.id, revision=revision).sha
            if not isinstance(commit, str):
                raise SourceUnavailable(f"{SOURCE} did not say which commit {air.id}@{revision} is")
            entries = [
                HubFile(f.path, f.size, f.lfs.sha256 if f.lfs else None, f.blob_id)
                for f in self._api.list_repo_tree(air.id, revision=commit, recursive=True)
                if isinstance(f, RepoFile)
            ]
        except HfHubHTTPError as exc:
            raise self._translate(exc, air, revision) from None
        except _TRANSPORT_ERROR as exc:
            raise SourceUnavailable(f"{SOURCE} could not be reached ({describe(exc, (self._token,))})") from None
        return commit, entries

    def _remote(self, air: AIR, commit: str, target: str, entry: HubFile) -> RemoteFile:
        return RemoteFile(
            path=target,
            label=f"{air.id}/{entry.path}",
            locate=functools.partial(self._locate, air.id, entry.path, commit),
            approx_size=entry.size,
            size=entry.size,
            sha256=entry.sha256,
            # Small files are plain git blobs, named by their git sha1 only: verified against that.
            git_sha1=None if entry.sha256 else entry.git_sha1,
            safetensors=target.endswith(".safetensors"),
            source=SOURCE,
            token_hint=TOKEN_HINT,
        )

    def _locate(self, repo: str, path: str, commit: str) -> Location:
        url = hf_hub_url(repo, path, revision=commit, endpoint=self._endpoint)
        # For the Hub's own URL only: the downloader drops Authorization when redirected to another origin (CDN).
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        return Location(url, headers)

    def _translate(self, exc: HfHubHTTPError, air: AIR, revision: str) -> ModelStoreError:
        status = exc.response.status_code if exc.response is not None else 0
        where = f"{air.id}@{revision}"
        if isinstance(exc, GatedRepoError):
            if self._token:
                return SourcePermissionDenied(f"{where} is gated on {SOURCE}; accept its terms for your token")
            return SourceUnauthenticated(f"{where} is gated on {SOURCE}; set {TOKEN_HINT}")
        if isinstance(exc, RepositoryNotFoundError):
            if status == 401 and not self._token:
                return SourceUnauthenticated(f"{air.id} was not found on {SOURCE}; if it is private, set {TOKEN_HINT}")
            return ModelNotFound(f"{air.id} was not found on {SOURCE}")
        if isinstance(exc, RevisionNotFoundError):
            return ModelNotFound(f"{air.id} has no revision {revision!r} on {SOURCE}")
        retry_after = exc.response.headers.get("Retry-After") if exc.response is not None else None
        return error_for_status(
            status,
            what=where,
            message=exc.server_message or "",
            source=SOURCE,
            token_hint=TOKEN_HINT,
            retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
            secrets=(self._token,),
        )


def select_diffusers_files(air: AIR, files: dict[str, HubFile]) -> dict[str, HubFile]:
    """Target path in the model folder -> repository entry, for the SDXL components of a diffusers repo."""
    if "model_index.json" not in files:
        raise ModelNotFound(
            f"{air.id} is not a diffusers-format repository (no model_index.json); for a single checkpoint "
            f"file name it: hf:{air.id}+path/to/file.safetensors"
        )
    chosen = {"model_index.json": files["model_index.json"]}
    for component in COMPONENTS:
        names = sorted(p.split("/", 1)[1] for p in files if p.startswith(f"{component}/") and p.count("/") == 1)
        if not names:
            continue
        for name in names:
            if name.endswith((".json", ".txt")) and ".safetensors.index" not in name:
                chosen[f"{component}/{name}"] = files[f"{component}/{name}"]
        weights = choose_weights(names)
        if component in _WEIGHTED and not weights:
            raise UnsafeCheckpoint(
                f"{air.id}: {component}/ has no safetensors weights (pickled weights are never loaded)"
            )
        for target, name in weights.items():
            chosen[f"{component}/{target}"] = files[f"{component}/{name}"]
    return chosen


def choose_weights(names: Iterable[str]) -> dict[str, str]:
    """Target name -> file name of one component's safetensors weights.

    Preference: fp16 single file, fp16 shards, plain single file, plain shards. Shards keep their names (the
    index file refers to them); a variant's single file or index takes the plain name."""
    available = set(names)
    for stem in _STEMS:
        single_fp16 = f"{stem}.fp16.safetensors"
        if single_fp16 in available:
            return {f"{stem}.safetensors": single_fp16}
        index_fp16 = f"{stem}.safetensors.index.fp16.json"
        shards_fp16 = sorted(n for n in available if re.fullmatch(re.escape(stem) + r"\.fp16" + _SHARD, n))
        if index_fp16 in available and shards_fp16:
            return {f"{stem}.safetensors.index.json": index_fp16, **{n: n for n in shards_fp16}}
        if f"{stem}.safetensors" in available:
            return {f"{stem}.safetensors": f"{stem}.safetensors"}
        index = f"{stem}.safetensors.index.json"
        shards = sorted(n for n in available if re.fullmatch(re.escape(stem) + _SHARD, n))
        if index in available and shards:
            return {index: index, **{n: n for n in shards}}
    return {}
