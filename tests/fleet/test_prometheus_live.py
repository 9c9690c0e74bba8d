"""The dashboard's queries and the alert rules against a real Prometheus scraping the local fleet.

Debian's `prometheus` (the package .ci/fleet.sh installs for promtool) scrapes two replicas every second; after
one request through the front, every panel query of deploy/grafana/refinery.json runs through the HTTP API
(`/api/v1/query`, Grafana's variables as they stand for "everything") and returns without error, and with data,
except the GPU panels, which have none on CPU replicas. The alert rules of deploy/prometheus/refinery-alerts.yml
are evaluated by the same Prometheus, every one healthy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from deploy.local.fleet import Fleet, FleetSettings, free_ports
from deploy.local.traffic import generate, generation_stub

from .conftest import PAIRS, needs_nginx

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "refinery.json"
ALERTS = ROOT / "deploy" / "prometheus" / "refinery-alerts.yml"
TIMEOUT_S = 120

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus is not installed (Debian: prometheus; .ci/fleet.sh does it)"
)


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every target, with Grafana's variables replaced by what they stand for."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")
            queries.append((panel["title"], expr))
    return queries


class _Prometheus:
    def __init__(self, targets: list[str], folder: Path) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "refinery-local", "static_configs": [{"targets": targets}]}],
        }
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        (port,) = free_ports("127.0.0.1", 1)
        self.url = f"http://127.0.0.1:{port}"
        self._log = (folder / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._folder = folder

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.url}{path}"
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read()) if path.startswith("/api/") else r.read()

    def query(self, expr: str) -> list[Any]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def wait_until(self, expr: str, what: str) -> None:
        """Until `expr` has a sample > 0 (the Prometheus log on failure)."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                if any(float(s["value"][1]) > 0 for s in self.query(expr)):
                    return
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise AssertionError(f"{what}: {(self._folder / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


@pytest.fixture
def scraped_fleet(fleet_cache: Path, tmp_path: Path) -> Iterator[tuple[Fleet, _Prometheus]]:
    settings = FleetSettings(replicas=2, run_dir=tmp_path / "fleet", cache_dir=fleet_cache, grace_s=5.0)
    with Fleet(settings) as fleet:
        prometheus = _Prometheus([f"127.0.0.1:{r.spec.metrics_port}" for r in fleet.replicas], tmp_path)
        try:
            yield fleet, prometheus
        finally:
            prometheus.close()


@needs_nginx
@needs_prometheus
@pytest.mark.slow
def test_every_dashboard_query_answers_with_data_after_one_request(scraped_fleet: tuple[Fleet, _Prometheus]) -> None:
    fleet, prometheus = scraped_fleet
    prometheus.wait_until('count(up{job="refinery-local"} == 1) == 2', "both replicas scraped")
    with grpc.insecure_channel(fleet.front) as channel:
        outcome = generate(generation_stub(channel), PAIRS[0], steps=2)
    assert outcome.ok, outcome
    # One request's images, seen by a scrape, and a rate over two scrapes that include it.
    prometheus.wait_until("sum(rate(refinery_images_total[1m]))", "the request's image never reached Prometheus")

    answers = {(title, expr): prometheus.query(expr) for title, expr in _panel_queries()}
    gpu = {key for key in answers if "refinery_gpu_" in key[1]}
    assert len(gpu) == 3, "the GPU panels' queries were not found"
    assert {key: result for key, result in answers.items() if key in gpu} == {key: [] for key in gpu}  # CPU
    assert [title for (title, expr), result in answers.items() if (title, expr) not in gpu and not result] == []
    # The thrash ratio has a value: the request loaded its pair, and Generate requests are its denominator.
    ratio = next(r for (title, _), r in answers.items() if title == "Model loads per request")
    assert float(ratio[0]["value"][1]) > 0

    rules = [r for g in prometheus.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == ["RefineryPairThrashing", "RefineryQueueBacklog", "RefineryReplicaDown"]
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
