"""Issue 21, items 9 and 10: settings that cannot work end `refinery serve` at once, in one line naming the
setting (never a token), with exit code 2: a token no client can send (empty, whitespace, non-ASCII), a
local-model root that is missing, relative or a file, TLS files that are not PEM, two listeners on one port."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import Pki, env_for_cli, refinery
from .test_operator_input import one_error_line

SECRET = "s3cr\u00e9t-token"


def _cases(tmp_path: Path, pki: Pki) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """(flags, environment, what the one line must name)."""
    files = {
        "empty": "",
        "blank": " \n\t\n",
        "non-ascii": SECRET + "\n",
        "two-lines": "first-half\nsecond-half\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "a-file").write_text("x")
    not_pem = str(tmp_path / "not.pem")
    (tmp_path / "not.pem").write_text("this is not a certificate\n")
    return {
        "empty token file": ([], {"REFINERY_TOKEN_FILE": str(tmp_path / "empty")}, "REFINERY_TOKEN_FILE"),
        "blank admin token file": (
            [],
            {"REFINERY_ADMIN_TOKEN_FILE": str(tmp_path / "blank")},
            "REFINERY_ADMIN_TOKEN_FILE",
        ),
        "non-ASCII token file": ([], {"REFINERY_TOKEN_FILE": str(tmp_path / "non-ascii")}, "REFINERY_TOKEN_FILE"),
        "token of two lines": ([], {"REFINERY_ADMIN_TOKEN_FILE": str(tmp_path / "two-lines")}, "REFINERY_ADMIN"),
        "empty token variable": ([], {"REFINERY_ADMIN_TOKEN": ""}, "REFINERY_ADMIN_TOKEN"),
        "blank token variable": ([], {"REFINERY_TOKEN": "   "}, "REFINERY_TOKEN"),
        "non-ASCII token variable": ([], {"REFINERY_TOKEN": SECRET}, "REFINERY_TOKEN"),
        "missing local-model root": (["--local-models", str(tmp_path / "nowhere")], {}, "--local-models"),
        "relative local-model root": (["--local-models", "models"], {}, "--local-models"),
        "local-model root that is a file": (["--local-models", str(tmp_path / "a-file")], {}, "--local-models"),
        "local-model roots from the environment": (
            [],
            {"REFINERY_LOCAL_MODELS": f"{tmp_path}:relative"},
            "REFINERY_LOCAL_MODELS",
        ),
        "loopback trust that is not yes or no": ([], {"REFINERY_TRUST_LOOPBACK_ADMIN": "maybe"}, "--trust-loopback"),
        "metrics on the gRPC port": (["--port", "50999", "--metrics-port", "50999"], {}, "--metrics-port"),
        "health on the metrics port": (["--metrics-port", "50998", "--health-port", "50998"], {}, "--health-port"),
        "a certificate that is not PEM": (
            ["--port", "0", "--tls-cert", str(tmp_path / "not.pem"), "--tls-key", str(pki.server_key)],
            {},
            "--tls-cert",
        ),
        "a key that is not the certificate's": (
            ["--port", "0", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],
            {},
            "--tls-key",
        ),
        "a client CA that is not PEM": (
            [
                "--port",
                "0",
                "--tls-cert",
                str(pki.server_cert),
                "--tls-key",
                str(pki.server_key),
                "--tls-client-ca",
                not_pem,
            ],
            {},
            "--tls-client-ca",
        ),
    }


def test_settings_that_cannot_work_end_in_one_line_and_exit_code_2(tmp_path: Path, pki: Pki) -> None:
    cases = _cases(tmp_path, pki)

    def attempt(case: str) -> tuple[str, int, str]:
        flags, env, _ = cases[case]
        cli_env = env_for_cli(REFINERY_CACHE_DIR=str(tmp_path / "cache"), **env)
        done = refinery("serve", "--host", "127.0.0.1", "--pin", "none", *flags, cwd=tmp_path, env=cli_env, timeout=90)
        return case, done.returncode, done.stderr

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, cases))
    for case, code, stderr in results:
        assert code == 2, (case, stderr)
        line = one_error_line(stderr)
        assert cases[case][2] in line, (case, line)
        assert SECRET not in stderr and "first-half" not in stderr, case  # the token never reaches a message
