"""tests/vm on a host without RDMA or /dev/nbd: collected, each test skipped with the reason
(not deselected); RRAM_REQUIRE_RDMA=1 turns the skips into failures.  Runs pytest for real."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import vm_unavailable_reason

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = "tests/vm/test_verbs_transport.py"



@pytest.fixture(autouse=True)
def _host_without_vm_facilities():
    if vm_unavailable_reason() is None:
        pytest.skip("this host can run vm tests: nothing to skip here")


def _pytest(*args: str, require: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RRAM_REQUIRE_RDMA"}
    if require:
        env["RRAM_REQUIRE_RDMA"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args, TARGET],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_vm_tests_skip_each_with_the_reason():
    proc = _pytest(require=False)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert " skipped" in proc.stdout and "passed" not in proc.stdout and "deselected" not in proc.stdout
    assert "needs the soft-RoCE VM (scripts/ci-vm.sh)" in proc.stdout


def test_require_rdma_turns_the_skips_into_failures():
    proc = _pytest("-x", require=True)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "required but unavailable: needs the soft-RoCE VM" in proc.stdout
