#!/usr/bin/env bash
# Create (or update) the virtual environment that `make demo` and `make test` use, and the one inside the
# container images (deploy/docker/Dockerfile.cpu and .gpu run this same script).
#
# On a machine without an NVIDIA GPU, torch==2.13.0 (a CPU build) is installed first: the project's torch
# requirement is a range that it satisfies, so pip keeps it instead of fetching a multi-GB CUDA build.
# On a GPU machine pip resolves the range to a CUDA build and the server uses the GPU.
# Override with TORCH_SPEC="torch==X.Y" when needed, and TORCH_INDEX_URL to take it from another index
# (PyTorch's CPU or CUDA wheel index, for the images).
# REFINERY_INSTALL=runtime installs the package alone (not editable, no dev tools, no pip cache): the images.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"
mode="${REFINERY_INSTALL:-dev}"
cd "$(dirname "$0")/.."

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
[ "$mode" = runtime ] && pip+=(--no-cache-dir)
"${pip[@]}" install --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
  if [ -n "${TORCH_SPEC:-}" ]; then
    "${pip[@]}" install "${index[@]}" "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "${index[@]}" "torch>=2.4"
  else
    "${pip[@]}" install "${index[@]}" "torch==2.13.0"
  fi
fi
# The contract and the Python client are their own distribution (refinery-client, no torch); the server
# depends on it by name, so it is installed from the tree first and pip never looks for it on an index.
case "$mode" in
  dev) "${pip[@]}" install -e clients/python && "${pip[@]}" install -e ".[dev]" ;;
  runtime) "${pip[@]}" install ./clients/python && "${pip[@]}" install . ;;
  *) echo "bootstrap.sh: REFINERY_INSTALL must be dev or runtime, got '$mode'" >&2; exit 2 ;;
esac
touch "$venv/.installed"
