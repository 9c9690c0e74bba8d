"""Validate the Kubernetes manifests offline: render every kustomization with `kubectl kustomize` and check
each object against the Kubernetes API schemas that the PyPI package kubernetes-validate bundles.

    python deploy/kubernetes/validate.py [--kubernetes 1.30.0,1.37.0]

Built-in kinds are validated strictly (an unknown field fails). Custom resources have no schema offline (their
CRDs ship with Envoy Gateway, Istio and the Prometheus Operator): the kinds listed in CUSTOM are skipped and
named as skipped; any other kind the schemas do not know fails, so a typo in a built-in apiVersion cannot pass
as "a CRD". Needs kubectl (its built-in kustomize) and kubernetes-validate; run by .ci/fleet.sh.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
KUSTOMIZATIONS = ("overlays/gpu", "overlays/cpu", "overlays/gpu-shared-cache", "routing/envoy-gateway")
PLAIN = ("secret.example.yaml", "routing/istio/destinationrule.yaml", "monitoring/servicemonitor.yaml")
CUSTOM = {
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
    ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for folder in KUSTOMIZATIONS:
        rendered = subprocess.run(
            ["kubectl", "kustomize", str(HERE / folder)], capture_output=True, text=True, check=True
        ).stdout
        for doc in yaml.safe_load_all(rendered):
            yield folder, doc
    for name in PLAIN:
        for doc in yaml.safe_load_all((HERE / name).read_text()):
            yield name, doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubernetes", default="1.30.0,1.37.0", help="versions to validate against")
    versions = parser.parse_args().kubernetes.split(",")
    failures = 0
    for source, doc in documents():
        kind = (doc["apiVersion"], doc["kind"])
        name = f"{source}: {doc['kind']}/{doc['metadata']['name']}"
        if kind in CUSTOM:
            print(f"skipped  {name} ({doc['apiVersion']}: a custom resource, no schema offline)")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                print(f"valid    {name} (Kubernetes {version})")
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
                failures += 1
                print(f"INVALID  {name} (Kubernetes {version}): {getattr(exc, 'message', exc)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
