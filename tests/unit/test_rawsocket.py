"""The benchmarks' raw-socket baseline: a real server process, both ways of waiting."""
from __future__ import annotations

import socket

import pytest

from rram.testing import rawsocket


@pytest.fixture
def server():
    proc, port = rawsocket.start()
    yield port
    rawsocket.stop(proc)


@pytest.mark.parametrize("spin_us", [0, 20], ids=["sleeping", "spinning"])
def test_reply_is_exactly_the_length_asked(server, spin_us):
    rt = rawsocket.RoundTrip(server, spin_us=spin_us)
    try:
        for length in (1, 2278, rawsocket.REPLY, 64, rawsocket.REPLY):
            rt(length)
        # nothing left over: a longer reply than asked would desynchronise the next round
        with pytest.raises(BlockingIOError):
            rt.sock.recv(1, socket.MSG_DONTWAIT)
    finally:
        rt.close()


def test_bad_length_is_refused_and_the_connection_still_serves(server):
    rt = rawsocket.RoundTrip(server)
    try:
        for bad in (0, -1, rawsocket.REPLY + 1):
            with pytest.raises(ValueError, match="reply length"):
                rt(bad)
        rt(100)
    finally:
        rt.close()
