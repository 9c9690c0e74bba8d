"""`buf breaking` for the contract against the previous commit of main.

    python3 .ci/buf_breaking.py BUF           # BUF: the buf executable (clients/typescript installs it)

The baseline is HEAD~1: on main, the first parent of the newest commit (for a merge commit, main as it was
before the merge), so every change to main is checked against the contract it replaces. Set
REFINERY_BREAKING_AGAINST to another git ref to check a branch (e.g. `main` from a feature branch).

v1 was allowed exactly one breaking change (issue 10): PinModel and UnpinModel stopped returning a bare
ModelInfo and got their own PinModelResponse / UnpinModelResponse. The two violations that change produces
are accepted, by their exact text, and nothing else is: once the baseline has the new responses they cannot
occur again, so this exception expires by itself and needs no baseline file to keep up to date.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ALLOWED = {
    (
        "RPC_SAME_RESPONSE_TYPE",
        f'RPC "{rpc}" on service "ModelService" changed response type from "refinery.v1.ModelInfo" to '
        f'"refinery.v1.{rpc}Response".',
    )
    for rpc in ("PinModel", "UnpinModel")
}


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def _baseline() -> str | None:
    """The commit to compare with; None in a shallow clone whose origin cannot give us the parent."""
    ref = os.environ.get("REFINERY_BREAKING_AGAINST", "HEAD~1")
    if _git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}").returncode != 0:
        shallow = _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true"
        if shallow:
            _git("fetch", "-q", "--deepen=1")
        if _git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}").returncode != 0:
            if shallow:
                return None
            sys.exit(f"buf breaking: no commit {ref} to compare the contract with")
    return _git("rev-parse", f"{ref}^{{commit}}").stdout.strip()


def main() -> int:
    buf = sys.argv[1]
    baseline = _baseline()
    if baseline is None:
        # Nothing to compare with is not a breaking change; say so loudly rather than fail every shallow CI.
        print("buf breaking: SKIPPED: a shallow clone without its parent commit (clone with history to check)")
        return 0
    result = subprocess.run(
        [buf, "breaking", "proto", "--against", f".git#ref={baseline},subdir=proto", "--error-format", "json"],
        capture_output=True,
        text=True,
    )
    if result.returncode not in (0, 100):  # 100: violations found; anything else: buf itself failed
        print(result.stdout, result.stderr, sep="", file=sys.stderr)
        return 1
    violations = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    refused = [v for v in violations if (v["type"], v["message"]) not in ALLOWED]
    for v in refused:
        print(f"{v['path']}:{v['start_line']}:{v['start_column']}: {v['type']}: {v['message']}", file=sys.stderr)
    if refused:
        print(f"buf breaking: the contract changed incompatibly against {baseline[:12]}", file=sys.stderr)
        return 1
    allowed = " (allowed: PinModel/UnpinModel responses, the one breaking change of v1)" if violations else ""
    print(f"buf breaking: compatible with {baseline[:12]}{allowed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
