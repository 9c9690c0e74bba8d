"""The Grafana dashboard and the Prometheus files: every query parses, and every metric a query reads is one
a replica serves (or one the server's metrics work is about to add, listed below)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local.fleet import free_ports
from deploy.local.replica import Replica, ReplicaSpec

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "refinery.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
# Metrics the dashboard reads that `refinery serve` does not declare yet: the server side of the fleet issue
# adds them (requests by code, end-to-end and first-step histograms, images, downloaded bytes, build info).
# Remove a name here once the server serves it (the test says so).
PENDING: set[str] = set()  # metrics the dashboard reads that no server serves yet
# Served only where there is a GPU (server/scheduling/gpu_gauges.py; tests/test_gpu_gauges.py checks them).
GPU_ONLY = {"refinery_gpu_utilization_ratio", "refinery_gpu_memory_used_bytes", "refinery_gpu_memory_total_bytes"}
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus; .ci/fleet.sh does it)"
)


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return exprs


def _as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for, so that promtool can parse the query."""
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    records = [{"record": f"dashboard:q{i}", "expr": _as_promql(e)} for i, e in enumerate(_queries())]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_promtool
def test_every_prometheus_file_checks() -> None:
    """deploy/prometheus/check.py, as CI runs it: every file there, prometheus-kubernetes.yml included."""
    check = subprocess.run(
        [sys.executable, str(PROMETHEUS / "check.py")], capture_output=True, text=True, check=False, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr
    names = sorted(p.name for p in PROMETHEUS.glob("*.y*ml"))
    assert names == ["prometheus-kubernetes.yml", "prometheus.yml", "refinery-alerts.yml"]
    assert [f"== {name}: ok" for name in names] == [line for line in check.stdout.splitlines() if line.startswith("==")]


@needs_promtool
def test_the_kubernetes_config_is_checked_even_by_a_promtool_without_kubernetes_discovery(tmp_path: Path) -> None:
    """A mistake outside the discovery block (a relabeling regex that does not compile) is still caught."""
    broken = (PROMETHEUS / "prometheus-kubernetes.yml").read_text().replace("regex: refinery", "regex: refinery(")
    assert "refinery(" in broken
    (tmp_path / "prometheus-kubernetes.yml").write_text(broken)
    (tmp_path / "refinery-alerts.yml").write_text((PROMETHEUS / "refinery-alerts.yml").read_text())
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); from check import check_file; from pathlib import Path;"
        "passed, said = check_file(Path(sys.argv[2])); print(passed); print(said)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(PROMETHEUS), str(tmp_path / "prometheus-kubernetes.yml")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert run.stdout.splitlines()[0] == "False", run.stdout
    assert "refinery(" in run.stdout  # promtool names the bad regex


@pytest.mark.slow
def test_dashboard_reads_only_metrics_a_replica_serves(tmp_path: Path) -> None:
    port, metrics_port = free_ports("127.0.0.1", 2)
    replica = Replica(
        ReplicaSpec("dashboard", "127.0.0.1", port, metrics_port, tmp_path / "cache", tmp_path / "replica.log")
    )
    replica.start()
    try:
        replica.wait_ready()
        served = replica.metric_names()
    finally:
        replica.stop()
    alerts = (PROMETHEUS / "refinery-alerts.yml").read_text()
    used = {m for text in [*_queries(), alerts] for m in re.findall(r"\brefinery_[a-z0-9_]+", text)}
    assert used >= GPU_ONLY and not GPU_ONLY & served  # the GPU panels are there; a CPU replica has no GPU series
    used -= GPU_ONLY
    assert used - served <= PENDING, f"queried but neither served nor pending: {sorted(used - served - PENDING)}"
    assert not PENDING & served, f"served now, remove from PENDING: {sorted(PENDING & served)}"
