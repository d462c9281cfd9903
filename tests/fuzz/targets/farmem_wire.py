"""Fuzz target: the far-memory control channel (rram/frontends/farmem/wire.py, Reader).

The bytes arrive on a Unix stream socket; the Reader must hand out JSON objects, one per line,
until the end of the stream, or raise ProtocolError; a prefetch request's range is parsed as the
handler parses it (wire.prefetch_range: pages inside the region, or ProtocolError).
"""
from __future__ import annotations

import socket

from tests.fuzz import driver

with driver.instrumented():
    from rram.frontends.farmem import wire
from rram.errors import ProtocolError

NPAGES = 2048


def one_input(data: bytes) -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)
        reader = wire.Reader(ours)
        try:
            for _ in range(len(data) + 1):
                msg, fds = reader.recv()
                assert fds == []
                if msg is None:
                    return
                assert isinstance(msg, dict)
                if msg.get("op") == "prefetch":
                    try:
                        first, last = wire.prefetch_range(msg, NPAGES, 4096)
                        assert 0 <= first <= NPAGES and 0 <= last <= NPAGES, (first, last)
                    except ProtocolError:
                        pass
            raise AssertionError("more messages than lines")
        except ProtocolError:
            pass


driver.main(__name__, one_input)
