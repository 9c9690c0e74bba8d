#!/usr/bin/env bash
# Create (or update) the virtual environment that `make demo` and `make test` use.
#
# On a machine without an NVIDIA GPU, torch==2.13.0 (a CPU build) is installed first: the project's torch
# requirement is a range that it satisfies, so pip keeps it instead of fetching a multi-GB CUDA build.
# On a GPU machine pip resolves the range to a CUDA build and the server uses the GPU.
# Override with TORCH_SPEC="torch==X.Y" when needed.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    "${pip[@]}" install "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.4"
  else
    "${pip[@]}" install "torch==2.13.0"
  fi
fi
# The contract and the Python client are their own distribution (refinery-client, no torch); the server
# depends on it by name, so it is installed from the tree first and pip never looks for it on an index.
"${pip[@]}" install -e clients/python
"${pip[@]}" install -e ".[dev]"
touch "$venv/.installed"
