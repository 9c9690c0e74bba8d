#!/usr/bin/env bash
# CI for the contract and the clients (clients/README.md), on a fresh clone; installs what it needs itself:
#   1. buf (npm, with the TypeScript example's pinned dependencies): lint, format, breaking against HEAD~1;
#   2. Ruby from Debian (ruby-grpc, ruby-grpc-tools, protoc, the well-known types);
#   3. the Python client in a clean virtual environment without torch, and its tests;
#   4. the TypeScript and Ruby chunk helpers' tests;
#   5. a real `refinery serve` on loopback (tiny models, CPU, from the project's .venv), and each language's
#      examples against it: a refined generation streamed and saved as a PNG, and a bad request whose
#      google.rpc.BadRequest is decoded; then that PNG uploaded through UploadImage (client-streaming) and
#      img2img run over it with a refiner, the result kept on the server and saved.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
step() { echo "== clients: $*"; }

step "buf and the TypeScript dependencies (npm ci)"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error)
buf="$root/clients/typescript/node_modules/.bin/buf"

step "buf lint, buf format, buf breaking"
(cd proto && "$buf" lint && "$buf" format -d --exit-code)
python3 .ci/buf_breaking.py "$buf"

step "Ruby from Debian"
missing=()
for package in ruby-grpc ruby-grpc-tools protobuf-compiler libprotobuf-dev; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

step "the Python client in a clean virtual environment"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "./clients/python[test]"
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then echo "torch came with the client" >&2; exit 1; fi
(cd clients/python && "$work/venv/bin/python" -m pytest -q tests)

step "the TypeScript and Ruby chunk helpers"
(cd clients/typescript && npm run --silent build && npm test --silent)
(cd clients/ruby && rake test)

step "a real server on loopback"
make -s setup
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/refinery serve --host 127.0.0.1 --port "$port" --devices cpu --cache-dir "$work/cache" \
  >"$work/server.log" 2>&1 &
server_pid=$!
# Ready once GenerationService reports SERVING (the default pair is loaded); give up if the server exits.
.venv/bin/python - "$port" "$server_pid" <<'EOF' || { cat "$work/server.log" >&2; exit 1; }
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

port, pid = sys.argv[1], int(sys.argv[2])
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
request = health_pb2.HealthCheckRequest(service="refinery.v1.GenerationService")
for _ in range(300):
    try:
        if stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
            sys.exit(0)
    except grpc.RpcError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited")
    time.sleep(1)
sys.exit("the server did not become ready")
EOF

passed=0
check_png() {  # NAME: the example's output is a PNG of the tiny models' 64x64
  python3 - "$work/$1.png" <<'EOF' || { cat "$work/$1.log" >&2; exit 1; }
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (64, 64), "not a 64x64 PNG"
EOF
}
expect() {  # NAME PATTERN WHAT: the example's log has a line matching PATTERN
  grep -q "$2" "$work/$1.log" || {
    cat "$work/$1.log" >&2
    echo "clients: the $1 example did not $3" >&2
    exit 1
  }
}
run_example() {  # NAME COMMAND...
  local name=$1
  shift
  if ! "$@" >"$work/$name.log" 2>&1; then
    cat "$work/$name.log" >&2
    echo "clients: the $name example failed" >&2
    exit 1
  fi
}
example() {  # NAME COMMAND...: the command gets HOST:PORT OUT.png
  local name=$1
  shift
  run_example "$name" "$@" "127.0.0.1:$port" "$work/$name.png"
  check_png "$name"
  expect "$name" "^  refiner.start_step: must be in 2..steps" "decode the BadRequest"
  echo "$name example: streamed, saved $(stat -c %s "$work/$name.png") bytes of PNG, decoded the BadRequest"
  passed=$((passed + 1))
}
# 20 steps at strength 0.5 run the last 10 of the 20-step grid (11..20); the refiner at 90 % takes 19..20.
img2img() {  # NAME COMMAND...: the command gets HOST:PORT OUT.png IN.png (the Python example's result)
  local name=$1
  shift
  run_example "$name" "$@" "127.0.0.1:$port" "$work/$name.png" "$work/python.png"
  check_png "$name"
  expect "$name" "^uploaded .* as sha256:[0-9a-f]\{64\} (64x64" "upload its input"
  expect "$name" "^img2img from step 11: 8 base + 2 refiner steps$" "run img2img on the grid's steps 11..20"
  expect "$name" "^kept as sha256:[0-9a-f]\{64\}$" "have its result kept"
  local steps
  steps=$(grep -c '^step ' "$work/$name.log")
  [ "$steps" -eq 10 ] || { cat "$work/$name.log" >&2; echo "clients: $name streamed $steps steps, not 10" >&2; exit 1; }
  echo "$name img2img example: uploaded, 10 steps streamed, result kept and saved"
  passed=$((passed + 1))
}
example python "$work/venv/bin/python" clients/python/examples/generate.py
example typescript node clients/typescript/dist/generate.js
example ruby ruby clients/ruby/generate.rb
img2img python-img2img "$work/venv/bin/python" clients/python/examples/img2img.py
img2img typescript-img2img node clients/typescript/dist/img2img.js
img2img ruby-img2img ruby clients/ruby/img2img.rb
# One request, three languages: the same seed over the same image gives the same PNG, so the same reference.
kept=$(grep -h '^kept as ' "$work"/*-img2img.log | sort -u | wc -l)
[ "$kept" -eq 1 ] || { grep -h '^kept as ' "$work"/*-img2img.log >&2; echo "clients: the img2img results differ" >&2; exit 1; }
echo "clients: $passed passed, 0 failed"
