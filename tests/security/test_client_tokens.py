"""Issue 13, finding 2: the CLI and the Python client send the tokens from the environment (REFINERY_TOKEN,
REFINERY_ADMIN_TOKEN, or a file each `_FILE` names), so a guarded server serves them and nobody else."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from refinery.client import Client, RefineryError
from tests.integration.conftest import ServerThread

from .conftest import ADMIN_TOKEN, TOKEN, env_for_cli, refinery


def cli(tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    done = refinery(*args, cwd=tmp_path, env=env_for_cli(**env))
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout + done.stderr


def test_models_list_sends_a_token(guarded: ServerThread, tmp_path: Path) -> None:
    anonymous = cli(tmp_path, "models", "list", "--server", guarded.address)
    assert anonymous[0] == 1 and "UNAUTHENTICATED" in anonymous[1]
    for variable, token in (("REFINERY_TOKEN", TOKEN), ("REFINERY_ADMIN_TOKEN", ADMIN_TOKEN)):
        code, output = cli(tmp_path, "models", "list", "--server", guarded.address, **{variable: token})
        assert code == 0, output
        assert "on disk" in output


def test_models_administration_sends_the_admin_token(guarded: ServerThread, tmp_path: Path) -> None:
    # An AIR the server refuses as malformed: INVALID_ARGUMENT (exit 2) proves the call was let through.
    args = ("models", "rm", "not-an-air", "--server", guarded.address)
    code, output = cli(tmp_path, *args, REFINERY_TOKEN=TOKEN)
    assert code == 1 and "PERMISSION_DENIED" in output
    code, output = cli(tmp_path, *args, REFINERY_TOKEN=TOKEN, REFINERY_ADMIN_TOKEN=ADMIN_TOKEN)
    assert code == 2 and "INVALID_ARGUMENT" in output
    secret = tmp_path / "admin-token"
    secret.write_text(ADMIN_TOKEN + "\n")  # as a mounted secret: a trailing newline
    code, output = cli(tmp_path, *args, REFINERY_ADMIN_TOKEN_FILE=str(secret))
    assert code == 2 and "INVALID_ARGUMENT" in output
    for token in (TOKEN, ADMIN_TOKEN):
        assert token not in output


def test_generate_sends_a_token(guarded: ServerThread, tmp_path: Path) -> None:
    # 999 steps: refused by validation, which only a request past the gate reaches.
    args = ("generate", "a cat", "--steps", "999", "--server", guarded.address)
    code, output = cli(tmp_path, *args)
    assert code == 1 and "UNAUTHENTICATED" in output
    for variable, token in (("REFINERY_TOKEN", TOKEN), ("REFINERY_ADMIN_TOKEN", ADMIN_TOKEN)):
        code, output = cli(tmp_path, *args, **{variable: token})
        assert code == 2 and "steps" in output, output


def test_the_python_client_sends_the_token_from_the_environment(
    guarded: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REFINERY_TOKEN", raising=False)
    with Client.from_env(guarded.address) as client, pytest.raises(RefineryError) as anonymous:
        list(client.generate("a cat", steps=999))
    assert anonymous.value.code is grpc.StatusCode.UNAUTHENTICATED
    monkeypatch.setenv("REFINERY_TOKEN", TOKEN)
    with Client.from_env(guarded.address) as client, pytest.raises(RefineryError) as invalid:
        list(client.generate("a cat", steps=999))
    assert invalid.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in invalid.value.field_violations] == ["steps"]
