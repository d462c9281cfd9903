"""Fuzz target: the provider's data-connection loop in C (ext/_tcpwire.pyx, WireServer.serve).

The bytes are what a requester sends after HELLO, on a socketpair; the loop runs them against a
region at a fixed address, once signed (frame key ``KEY``: what a provider runs) and once not.
Oracle: ``serve`` ends with a result the provider words as a ProtocolError or Busy (wire.py
words a bad header), never another code; no byte around the region changes; every byte the
loop sent parses with the reference decoder as COMPLETIONs (signed ones verified under
``KEY`` when the loop was), one per REQUEST the reference decoder reads from the input, in
order; the I/O budget is whole again after ``release``.
"""
from __future__ import annotations

import queue
import socket
import threading

from tests.fuzz import driver, fixed

MEM = fixed.mapping(fixed.REGION, fixed.REGION_SIZE)  # before any other RegionTable: key FIRST_KEY
with driver.instrumented():
    from rram.transport import wire
from rram._ext import _regions, _tcpwire
from rram.errors import ProtocolError

TABLE = _regions.RegionTable()
RKEY = TABLE.register(fixed.REGION, fixed.REGION_SIZE)
assert RKEY == fixed.FIRST_KEY, RKEY
KEY = bytes(range(32))
BUDGET = _tcpwire.IoBudget(1 << 20)
ENDS = {_tcpwire.R_EOF, _tcpwire.R_BAD_HEADER, _tcpwire.R_BAD_PAYLOAD, _tcpwire.R_READ_LIMIT, _tcpwire.R_BAD_MAC,
        _tcpwire.R_BUDGET}


class _Drain:
    """A thread that reads the peer's end while ``serve`` runs (replies can exceed a socket buffer)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            sock = self.jobs.get()
            got = bytearray()
            while chunk := sock.recv(1 << 16):
                got += chunk
            self.done.put(bytes(got))


DRAIN = _Drain()


def _serve(data: bytes, keyed: bool) -> tuple[int, bytes, bytes]:
    ours, peer = socket.socketpair()
    with ours, peer:
        core = _tcpwire.WireServer(ours.fileno(), BUDGET)
        if keyed:
            core.set_frame_key(KEY)
        DRAIN.jobs.put(peer)
        peer.sendall(data)  # MAX_LEN (12 KiB) at most: fits the socket's buffer
        peer.shutdown(socket.SHUT_WR)
        rc = core.serve(TABLE)
        head = core.header()
        core.mark_closed()
        core.release()
        ours.shutdown(socket.SHUT_RDWR)
        sent = DRAIN.done.get(timeout=10)
    assert BUDGET.available == BUDGET.total, "the I/O budget leaked"
    return rc, head, sent


def _reference_batches(data: bytes) -> list[int]:
    """Batch ids of the REQUESTs the reference decoder reads."""
    dec = wire.Decoder(wire.TO_PROVIDER)
    dec.feed(data)
    out = []
    try:
        for ev in dec.events():
            if isinstance(ev, wire.Request):
                out.append(ev.batch_id)
    except ProtocolError:
        pass
    return out


def one_input(data: bytes) -> None:
    for keyed in (True, False):
        rc, head, sent = _serve(data, keyed)
        assert rc in ENDS, f"serve ended with {rc}"
        if rc == _tcpwire.R_BAD_HEADER:
            try:
                h = wire.parse_header(head, 0, wire.TO_PROVIDER)
                unsigned_mac = h.type == wire.REQUEST and h.flags == wire.FLAG_MAC and not keyed
                assert h.type == wire.HELLO or unsigned_mac, f"C refused a header the reference takes: {h}"
            except ProtocolError:
                pass
        dec = wire.Decoder(wire.TO_REQUESTER, key=KEY if keyed else None)
        dec.feed(sent)
        done = [ev.batch_id for ev in dec.events()]
        assert dec.buffered == 0, "a partial frame was sent"
        expected = _reference_batches(data)
        assert done == expected[: len(done)], f"completions {done} for requests {expected}"
    assert fixed.guards_intact(MEM), "a copy wrote outside the registered region"


driver.main(__name__, one_input)
