#!/usr/bin/env bash
# The benchmark report: runs every host suite in bench/ 3 times (pytest-benchmark JSON) and
# writes bench/report/README.md with PNG plots (bench/report.py).  Sized for about 10 minutes
# on a 2-CPU machine (at most 25); run it on a machine that is otherwise idle, or its figures
# are noise.
#
#   scripts/bench-report.sh             the full report, into bench/report/
#   scripts/bench-report.sh --quick     small sizes, 1 run, into a temp dir: checks that it works
#   scripts/bench-report.sh --swap      also what swaps for the whole machine (root; nobody else on
#                                       the machine): Redis, the swap-bound workload, FarMemory vs swap
#   scripts/bench-report.sh --vm        also the soft-RoCE guest's suite (scripts/bench-vm.sh, ~8 min a
#                                       boot; --vm-runs N): verbs vs perftest, Redis and swap via /dev/nbd0
#   RRAM_BENCH_PIN=same scripts/bench-report.sh     pin everything on CPU 0 (default: split)
# Other arguments go to bench/report.py (--runs N, --out DIR, --suite FILE, --render-only DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${RRAM_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "bench-report: $PY not found; run scripts/setup.sh first" >&2; exit 2; }
"$PY" -c 'import matplotlib, pytest_benchmark' 2>/dev/null \
  || { echo "bench-report: matplotlib or pytest-benchmark missing; run scripts/setup.sh" >&2; exit 2; }
exec "$PY" bench/report.py "$@"
