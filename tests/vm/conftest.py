"""Tests that need what only the soft-RoCE VM (or a real RDMA host) has.

Everything under tests/vm carries the ``vm`` marker.  Verbs tests use ``rdma_devices``,
which skips with the reason when no RDMA device has an active port, and fails instead when
RRAM_REQUIRE_RDMA=1 (set by scripts/rxe-vm/run).
"""
from __future__ import annotations

import pytest

from rram.transport import verbs
from tests.conftest import require_or_skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/vm/" in item.nodeid and item.get_closest_marker("vm") is None:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def rdma_devices() -> list[str]:
    """Names of the RDMA devices with an active port 1, e.g. ["rxe0", "rxe1"] in the VM."""
    require_or_skip(verbs.unavailable_reason())
    from rram._ext import _verbs

    names, _ = _verbs.device_names()
    active = []
    for name in names:
        with _verbs.Context(name) as ctx:
            if ctx.query_port(1)["active"]:
                active.append(name)
    return active


@pytest.fixture(scope="session")
def device_pair(rdma_devices) -> tuple[str, str]:
    """(requester device, provider device): two devices when there are two (rxe0 -> rxe1 over
    the veth pair), else loopback on one."""
    return rdma_devices[0], rdma_devices[-1]
