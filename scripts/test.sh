#!/usr/bin/env bash
# Run rram's test suite on this host (unit + integration with real provider processes).
# Tests that need RDMA, /dev/nbd* or root (tests/vm, marker `vm`) are collected and skip here,
# each with the reason (tests/conftest.py); scripts/ci-vm.sh runs them for real inside the
# soft-RoCE VM.  Extra arguments go to pytest.
#
#   scripts/test.sh                 the whole host suite
#   scripts/test.sh tests/unit -x   a part of it
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${RRAM_PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "test: $PY not found; run scripts/setup.sh first" >&2
  exit 2
fi
"$PY" -m pytest -p no:cacheprovider "$@"
rc=$?
if [ $rc = 5 ]; then
  echo "test: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $rc
