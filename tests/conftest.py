"""Shared test configuration.

RRAM_REQUIRE_RDMA=1 (or --require-rdma) turns skips for a missing RDMA device, /dev/nbd* or
root into failures: set it on hosts (and in the soft-RoCE VM) that do have them.
"""
from __future__ import annotations

import os

import pytest


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
