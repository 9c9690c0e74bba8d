#!/usr/bin/env bash
# CI for the contract and the clients (clients/README.md), on a fresh clone; installs what it needs itself:
#   1. buf (npm, with the TypeScript example's pinned dependencies): lint, format, breaking against HEAD~1;
#   2. Ruby from Debian (ruby-grpc, ruby-grpc-tools, protoc, the well-known types);
#   3. the Python client in a clean virtual environment without torch, and its tests;
#   4. the TypeScript and Ruby chunk helpers' tests;
#   5. a real `refinery serve` on loopback (tiny models, CPU, from the project's .venv), and each language's
#      example against it: a refined generation streamed and saved as a PNG, and a bad request whose
#      google.rpc.BadRequest is decoded.
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
example() {  # NAME COMMAND...: the command gets HOST:PORT OUT.png
  local name=$1 out="$work/$1.png"
  shift
  if ! "$@" "127.0.0.1:$port" "$out" >"$work/$name.log" 2>&1; then
    cat "$work/$name.log" >&2
    echo "clients: the $name example failed" >&2
    exit 1
  fi
  # A PNG of the tiny models' 64x64, and the bad request's field named from its BadRequest detail.
  python3 - "$out" <<'EOF' || { cat "$work/$name.log" >&2; exit 1; }
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (64, 64), "not a 64x64 PNG"
EOF
  grep -q "^  refiner.start_step: must be in 2..steps" "$work/$name.log" || {
    cat "$work/$name.log" >&2
    echo "clients: the $name example did not decode the BadRequest" >&2
    exit 1
  }
  echo "$name example: streamed, saved $(stat -c %s "$out") bytes of PNG, decoded the BadRequest"
  passed=$((passed + 1))
}
example python "$work/venv/bin/python" clients/python/examples/generate.py
example typescript node clients/typescript/dist/generate.js
example ruby ruby clients/ruby/generate.rb
echo "clients: $passed passed, 0 failed"
