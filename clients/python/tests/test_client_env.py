"""`from_env` reads the tokens from files as Kubernetes mounts secrets (REFINERY_TOKEN_FILE,
REFINERY_ADMIN_TOKEN_FILE), with the server's rules: the file wins over the variable, whitespace around the
token is dropped, and a file that cannot be read or holds no usable token is an error naming the variable,
never the token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from scripted_server import FakeServer

from refinery.client import AsyncClient, Client
from refinery.v1 import models_pb2 as pb


def test_tokens_come_from_the_files_the_variables_name(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("gen-from-file\n")  # a secret written by `echo` ends with a line break
    (tmp_path / "admin").write_text("  adm-from-file  ")
    monkeypatch.setenv("REFINERY_TOKEN", "gen-from-variable")  # the file wins, as on the server
    monkeypatch.setenv("REFINERY_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("REFINERY_ADMIN_TOKEN_FILE", str(tmp_path / "admin"))
    fake.admin.answers["ListModels"] = [pb.ListModelsResponse()]
    fake.admin.answers["DeleteModel"] = [pb.DeleteModelResponse()]

    with Client.from_env(fake.target) as client:
        list(client.generate("a token from a mounted secret"))
        client.list_models()
        client.delete_model("builtin:tiny-sdxl@1")

    assert fake.service.calls[0].metadata["authorization"] == "Bearer gen-from-file"
    assert [c.metadata["authorization"] for c in fake.admin.calls] == ["Bearer gen-from-file", "Bearer adm-from-file"]


def test_the_async_client_reads_the_same_files(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("async-from-file")
    monkeypatch.setenv("REFINERY_TOKEN_FILE", str(tmp_path / "token"))

    async def generate() -> None:
        async with AsyncClient.from_env(fake.target) as client:
            async for _ in client.generate("async"):
                pass

    asyncio.run(generate())
    assert fake.service.calls[0].metadata["authorization"] == "Bearer async-from-file"


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "REFINERY_TOKEN_FILE {path}: No such file or directory"),
        ("\n", "REFINERY_TOKEN_FILE {path}: the file holds no token"),
        ("two words", "REFINERY_TOKEN_FILE {path}: a token may hold only visible ASCII characters"),
    ],
)
def test_an_unusable_token_file_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None, complaint: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("REFINERY_TOKEN_FILE", str(path))
    with pytest.raises(ValueError) as refused:
        Client.from_env("127.0.0.1:1")
    assert str(refused.value).startswith(complaint.format(path=path))
    assert "words" not in str(refused.value)
