"""promtool over every Prometheus file in this folder: `check config` for each configuration (a file with
`scrape_configs`), `check rules` for each rules file (a file with `groups`). A file that is neither fails.

    python deploy/prometheus/check.py [PROMTOOL]

Debian's promtool (2.42, what .ci/fleet.sh installs) is built without Kubernetes discovery and refuses
`kubernetes_sd_configs` ("field kubernetes_sd_configs not found"). For a configuration it refuses for that
alone, the script checks a copy with each such block replaced by an empty `static_configs` (relabeling, rule
files and the rest exactly as written), and says that the discovery block itself went unchecked. A promtool
from prometheus.io checks the file whole. Needs PyYAML; run by .ci/fleet.sh and tests/fleet/test_dashboard.py.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
_NO_KUBERNETES = "field kubernetes_sd_configs not found"


def check_file(path: Path, promtool: str = "promtool") -> tuple[bool, str]:
    """(passed, what promtool said) for one file."""
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or not ({"scrape_configs", "groups"} & document.keys()):
        return False, f"{path.name}: neither a Prometheus configuration nor a rules file"
    if "groups" in document:
        return _promtool(promtool, "rules", path)
    passed, said = _promtool(promtool, "config", path)
    if passed or _NO_KUBERNETES not in said:
        return passed, said
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / path.name
        copy.write_text(yaml.safe_dump(_without_kubernetes_discovery(document, path.parent)))
        passed, said = _promtool(promtool, "config", copy)
    note = "kubernetes_sd_configs not checked: this promtool has no Kubernetes discovery; the rest was checked"
    return passed, f"{said.strip()}\n  ({note})"


def _without_kubernetes_discovery(document: dict[str, Any], folder: Path) -> dict[str, Any]:
    copy = dict(document)
    copy["rule_files"] = [str(folder / name) for name in document.get("rule_files", [])]  # the copy lives elsewhere
    jobs = []
    for job in document.get("scrape_configs", []):
        job = dict(job)
        if job.pop("kubernetes_sd_configs", None) is not None:
            job.setdefault("static_configs", [])
        jobs.append(job)
    copy["scrape_configs"] = jobs
    return copy


def _promtool(promtool: str, kind: str, path: Path) -> tuple[bool, str]:
    run = subprocess.run(
        [promtool, "check", kind, path.name], cwd=path.parent, capture_output=True, text=True, check=False
    )
    return run.returncode == 0, run.stdout + run.stderr


def main(argv: list[str]) -> int:
    promtool = argv[0] if argv else "promtool"
    files = sorted([*HERE.glob("*.yml"), *HERE.glob("*.yaml")])
    failed = 0
    for path in files:
        passed, said = check_file(path, promtool)
        print(f"== {path.name}: {'ok' if passed else 'FAILED'}\n{said.strip()}")
        failed += not passed
    return 1 if failed or not files else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
