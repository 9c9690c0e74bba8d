#!/usr/bin/env bash
# Wheels that benchmarks/gpu_sdxl.py needs on the H200 machine beyond what its image holds (Python 3.12,
# torch 2.11; no network there): run here, once, in the repository root; the run then carries `.whl`.
#
#   benchmarks/gpu_wheels.sh          # writes .whl/
#
# (.whl/ is in .gitignore.) Then, as one device call (carry: [".whl"], timeout_s 600; about 8 minutes on an H200):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit; \
#   PYTHONUNBUFFERED=1 python3 benchmarks/gpu_sdxl.py --budget 470 2>&1 | tee $OUT/gpu_sdxl.log
# $OUT/gpu_sdxl.json holds the figures (rewritten after every section, so a cut run keeps what it measured).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python=${PYTHON:-.venv/bin/python}
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  diffusers==0.42.1 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  grpcio-status==1.85.3 googleapis-common-protos==1.76.0 protobuf==7.36.2 torchao==0.17.0 py-spy==0.4.3
du -sh .whl
