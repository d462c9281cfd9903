"""Shared test configuration.

RRAM_REQUIRE_RDMA=1 (or --require-rdma) turns skips for a missing RDMA device, /dev/nbd* or
root into failures: set it on hosts (and in the soft-RoCE VM) that do have them.

Tests marked ``vm`` are collected everywhere; on a host with neither an active RDMA device nor
a kernel NBD client each one skips with the reason (scripts/ci-vm.sh runs them in the guest),
instead of vanishing from the run as ``-m "not vm"`` would make them.
"""
from __future__ import annotations

import functools
import os

import pytest

NBD_DEVICE = "/dev/nbd0"


def pytest_addoption(parser):
    parser.addoption("--require-rdma", action="store_true", help="fail instead of skipping RDMA/NBD/root tests")


def pytest_configure(config):
    if config.getoption("--require-rdma"):
        os.environ["RRAM_REQUIRE_RDMA"] = "1"


def require_or_skip(reason: str | None) -> None:
    """Skip with ``reason``, or fail when the host is declared to have RDMA/NBD/root."""
    if reason is None:
        return
    if os.environ.get("RRAM_REQUIRE_RDMA") == "1":
        pytest.fail(f"required but unavailable: {reason}")
    pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def vm_unavailable_reason() -> str | None:
    """None where ``vm`` tests can run (an RDMA device with an active port, or a kernel NBD
    client), else why not.  Each test still checks what it needs itself (root, nbd-client...).
    Asked once a session, and only when a ``vm`` test is about to run."""
    from rram.transport import verbs  # opens the devices: not at import time

    rdma = verbs.unavailable_reason()
    if rdma is None or os.path.exists(NBD_DEVICE):
        return None
    return (f"needs the soft-RoCE VM (scripts/ci-vm.sh) or a host with RDMA or {NBD_DEVICE}: "
            f"{rdma}; {NBD_DEVICE} is missing")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # before any fixture: a vm test's fixtures start providers or open devices
    if item.get_closest_marker("vm") is not None:
        require_or_skip(vm_unavailable_reason())
