"""Fixtures that start real provider processes on loopback (rram/testing/cluster.py)."""
from __future__ import annotations

import pytest

from rram import transport
from rram.testing.cluster import LocalCluster

#: short enough that grace expiry and stalled peers are tested in about a second
LEASE_GRACE = 1.0
IO_TIMEOUT = 1.0


def tcp_cluster(**options) -> LocalCluster:
    """A LocalCluster of tcp provider processes; skips when the tcp transport is unavailable."""
    reason = transport.unavailable_reason("tcp")
    if reason:
        pytest.skip(reason)
    return LocalCluster(transport="tcp", **options)


@pytest.fixture
def cluster(tmp_path):
    """Two tcp providers with 8 MiB each, 1 MiB slabs, a 1 s lease grace and a 1 s I/O timeout."""
    with tcp_cluster(n_providers=2, capacity="8MiB", workdir=str(tmp_path), slab_size="1MiB",
                     lease_grace=LEASE_GRACE, io_timeout=IO_TIMEOUT) as c:
        yield c
