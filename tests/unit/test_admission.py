"""The connection caps shared by a provider's control and data listeners."""
from __future__ import annotations

import pytest

from rram.transport.admission import Admission, Busy, Caps


def test_caps_per_peer_total_and_handshakes_and_release():
    a = Admission(Caps(max_connections=4, max_connections_per_peer=2, max_handshakes=3))
    t1, t2 = a.admit("10.0.0.1", "control"), a.admit("10.0.0.1", "data")
    with pytest.raises(Busy, match="2 connections from 10.0.0.1 \\(max_connections_per_peer 2\\)"):
        a.admit("10.0.0.1", "control")
    t3 = a.admit("10.0.0.2", "control")
    with pytest.raises(Busy, match="3 connections still in their handshake"):
        a.admit("10.0.0.3", "control")
    t1.authenticated()  # a proven peer leaves the handshake count, not the totals
    t1.authenticated()  # idempotent
    t4 = a.admit("10.0.0.3", "control")
    with pytest.raises(Busy, match="4 connections open \\(max_connections 4\\)"):
        a.admit("10.0.0.4", "control")
    assert a.stats() == {"connections": 4, "handshakes": 3, "peers": 3, "refused": 3}
    for t in (t1, t2, t3, t4, t4):  # close is idempotent
        t.close()
    assert a.stats() == {"connections": 0, "handshakes": 0, "peers": 0, "refused": 3}
    a.admit("10.0.0.1", "control")
