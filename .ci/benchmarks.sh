#!/usr/bin/env bash
# CI for the benchmarks (issue 16): every benchmark's --quick, one after another with the project's .venv, so a
# benchmark that no longer runs fails the build. --quick is the real run with tiny sizes and one repetition (the
# same code path); its figures mean nothing and it records none (benchmarks/RESULTS.md, benchmarks/results/).
#
#   bash .ci/benchmarks.sh                                # all of them (make bench-quick)
#   bash .ci/benchmarks.sh bench_scheduler bench_compare  # only these
#
# Every benchmarks/bench_*.py is found by its name, so a new one is checked without editing this file. Each
# one's wall time is printed; the first failure (or a run past REFINERY_BENCH_TIMEOUT seconds, default 600)
# stops the script with a line naming the benchmark, after the end of its output. bench_fleet needs nginx:
# .ci/fleet.sh installs it earlier in .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
limit=${REFINERY_BENCH_TIMEOUT:-600}
[ -x "$python" ] || { echo "benchmarks.sh: $python is missing (make setup creates it)" >&2; exit 1; }

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for path in benchmarks/bench_*.py benchmarks/gpu_encode_overlap.py benchmarks/gpu_sdxl.py; do
    names+=("$(basename "$path" .py)")
  done
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
seconds() { awk -v ns="$(($(date +%s%N) - $1))" 'BEGIN { printf "%.1f", ns / 1e9 }'; }
summary=()
all=$(date +%s%N)
for name in "${names[@]}"; do
  echo "== benchmark: $name --quick"
  started=$(date +%s%N)
  status=0
  timeout "$limit" "$python" "benchmarks/$name.py" --quick >"$log" 2>&1 || status=$?
  took=$(seconds "$started")
  if [ "$status" -ne 0 ]; then
    tail -n 80 "$log"
    why="exit $status"
    [ "$status" -eq 124 ] && why="over ${limit}s"
    echo "benchmarks.sh: FAILED: benchmarks/$name.py --quick ($why, after ${took}s)" >&2
    exit 1
  fi
  echo "   ok in ${took}s"
  summary+=("$(printf '%-22s %7ss' "$name" "$took")")
done
echo "== benchmarks: all ${#names[@]} quick runs passed in $(seconds "$all")s"
printf '   %s\n' "${summary[@]}"
