"""The conformance suite against the in-process and tcp transports (tcp provider in a thread)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from rram import errors, transport
from rram.transport import OP_WRITE
from tests.conformance.suite import *  # noqa: F401,F403
from tests.conformance.suite import PAGE, Link, crc, fill


@dataclass
class Pair:
    provider: transport.ProviderTransport
    requester: transport.RequesterTransport


@pytest.fixture(params=["loopback", "tcp"])
def transport_pair(request):
    reason = transport.unavailable_reason(request.param)
    if reason:
        pytest.skip(reason)
    pair = Pair(transport.provider_transport(request.param), transport.requester_transport(request.param))
    yield pair
    pair.requester.close()
    pair.provider.close()


def test_stats_count_batches_bytes_and_regions(transport_pair):
    lk = Link(transport_pair)
    try:
        offs = np.arange(8) * PAGE
        lk.run(lk.ops(offs, offs, PAGE, OP_WRITE))
        with pytest.raises(errors.RemoteAccessError):
            lk.run(lk.ops(0, 0, PAGE, OP_WRITE, rkey=lk.rkey ^ 1))
        s = transport_pair.provider.stats()
        assert s["batches"] == 2 and s["ops"] == 8 and s["errors"] == 1
        assert s["bytes_written"] == 8 * PAGE and s["bytes_read"] == 0
        assert s["regions"] == 1 and s["connections"] == 1
    finally:
        lk.close()
    assert transport_pair.provider.stats()["regions"] == 0


def test_recover_redials_while_the_session_lives(transport_pair):
    lk = Link(transport_pair)
    try:
        fill(lk.local[:PAGE], 1)
        lk.ep.recover()
        lk.run(lk.ops(0, 0, PAGE, OP_WRITE))
        assert crc(lk.remote[:PAGE]) == crc(lk.local[:PAGE])
        lk.session.close()
        with pytest.raises(errors.ConnectionLost):
            lk.ep.recover()
    finally:
        lk.close()
