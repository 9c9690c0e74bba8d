"""A fake Hugging Face Hub: the minimal routes huggingface_hub needs (shared/research/modelstore.md §3.7),
plus an optional CDN on another port that LFS files are redirected to, as the real Hub does."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote

from tests.fakes.server import FakeServer, Handler, Seen, serve_range


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(".safetensors") or path.endswith(".bin")


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str = field(default_factory=lambda: uuid.uuid4().hex + uuid.uuid4().hex[:8])
    # path -> bytes served instead of the published ones (a corrupted mirror)
    served_instead: dict[str, bytes] = field(default_factory=dict)
    private: bool = False


class FakeCDN(FakeServer):
    """Serves blobs by sha256 behind one-time signed links; refuses requests with Authorization."""

    def __init__(self) -> None:
        super().__init__()
        self.blobs: dict[str, bytes] = {}

    def link(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return f"{self.url}/blobs/{sha}?Signature={uuid.uuid4().hex}&Expires=9999999999"

    def handle(self, handler: Handler, request: Seen) -> None:
        if "authorization" in request.headers:
            handler.send_body(400, b"no auth headers on signed URLs")
            return
        data = self.blobs.get(request.path.removeprefix("/blobs/"))
        if data is None:
            handler.send_body(404, b"")
            return
        serve_range(handler, data, {"Content-Type": "application/octet-stream"})


class FakeHub(FakeServer):
    def __init__(self, *, token: str | None = None, cdn: FakeCDN | None = None) -> None:
        super().__init__()
        self.repos: dict[str, HubRepo] = {}
        self.token = token
        self.cdn = cdn
        self.fail_api: tuple[int, dict[str, object]] | None = None  # (status, JSON body) for every API call

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> HubRepo:
        repo = HubRepo(dict(files), private=private)
        self.repos[repo_id] = repo
        return repo

    def file_gets(self, repo_id: str) -> list[str]:
        """Paths of the files whose bytes were requested, in order."""
        prefix = f"/{repo_id}/resolve/"
        return [r.path.removeprefix(prefix).split("/", 1)[1] for r in self.seen("GET", prefix)]

    def handle(self, handler: Handler, request: Seen) -> None:
        path = unquote(request.path)
        if path.startswith("/api/models/"):
            self._api(handler, request, path.removeprefix("/api/models/"))
            return
        owner, name, kind, rest = [*path.lstrip("/").split("/", 3), "", "", ""][:4]
        if kind != "resolve":
            handler.send_body(404, b"", {"X-Error-Code": "RepoNotFound"})
            return
        repo = self._repo(handler, request, f"{owner}/{name}")
        if repo is None:
            return
        revision, _, file_path = rest.partition("/")
        if revision not in ("main", repo.commit):
            handler.send_body(404, b"", {"X-Error-Code": "RevisionNotFound"})
            return
        if file_path not in repo.files:
            handler.send_body(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
            return
        published = repo.files[file_path]
        data = repo.served_instead.get(file_path, published)
        etag = hashlib.sha256(published).hexdigest() if is_lfs(file_path) else git_blob_sha1(published)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"'}
        if self.cdn is not None and is_lfs(file_path):
            headers.update({"Location": self.cdn.link(data), "X-Linked-Etag": f'"{etag}"'})
            headers["X-Linked-Size"] = str(len(published))
            handler.send_body(302, b"", headers)
            return
        serve_range(handler, data, headers)

    def _repo(self, handler: Handler, request: Seen, repo_id: str) -> HubRepo | None:
        repo = self.repos.get(repo_id)
        authorised = self.token is not None and request.headers.get("authorization") == f"Bearer {self.token}"
        if repo is None or (repo.private and not authorised):
            # The Hub answers 401 + RepoNotFound for private repositories without a valid token.
            handler.send_json(401 if repo else 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        return repo

    def _api(self, handler: Handler, request: Seen, rest: str) -> None:
        if self.fail_api is not None:
            handler.send_json(*self.fail_api)
            return
        owner, name, kind, tail = [*rest.split("/", 3), "", "", ""][:4]
        repo = self._repo(handler, request, f"{owner}/{name}")
        if repo is None:
            return
        revision, _, sub = tail.partition("/")
        if revision not in ("main", repo.commit):
            handler.send_json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return
        if kind == "revision":
            handler.send_json(200, {"id": f"{owner}/{name}", "sha": repo.commit, "siblings": []})
        elif kind == "tree":
            entries = []
            for path, data in sorted(repo.files.items()):
                if sub and not path.startswith(sub.rstrip("/") + "/"):
                    continue
                entry: dict[str, object] = {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "oid": git_blob_sha1(data),
                }
                if is_lfs(path):
                    lfs_oid = hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"oid": lfs_oid, "size": len(data), "pointerSize": 134}
                entries.append(entry)
            handler.send_json(200, entries)
        else:
            handler.send_json(404, {"error": "not found"})
