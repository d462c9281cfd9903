"""Fuzz target: the requester's completion parser in C (ext/_tcpwire.pyx, WireRequester.poll),
through the real TcpEndpoint (rram/transport/tcp.py), which words every failure.

An endpoint on a socketpair posts the two batches of ``BATCHES``; the bytes are the provider's
answer, read once by a core with the frame key ``KEY`` (what a requester runs: completions
must be signed) and once by one without.  Oracle: ``poll`` returns completions of the posted
batches, in order, with a status and index that fit the batch, or raises the project's
TransportError (ConnectionLost) / ProtocolError; with the key, it returns exactly what the
reference decoder verifies (wire.Decoder with the key); the READ scatter never writes outside
the local buffer.
"""
from __future__ import annotations

import socket

from tests.fuzz import driver, fixed

MEM = fixed.mapping(fixed.LOCAL, fixed.REGION_SIZE)
with driver.instrumented():
    from rram.transport import tcp
from rram.errors import ProtocolError, TransportError
from rram.transport import wire
from rram.transport.base import OP_READ, OP_WRITE, new_completions, new_ops

#: (batch id, [(opcode, length)]) posted before the answer is read; seeds.py answers them
BATCHES = [(7, [(OP_READ, 64), (OP_WRITE, 64), (OP_READ, 128)]), (8, [(OP_READ, 4096)])]
KEY = bytes(range(32, 64))  # the connection's frame key; seeds.py signs with it


def _ops(lkey: int, spec) -> "np.ndarray":  # noqa: F821 - numpy, through new_ops
    ops = new_ops(len(spec))
    for i, (opcode, length) in enumerate(spec):
        ops[i] = (fixed.LOCAL + 64 * i, fixed.REGION + 64 * i, length, lkey, fixed.FIRST_KEY, opcode, (0, 0, 0))
    return ops


def _verified(data: bytes) -> list[int]:
    """Batch ids of the COMPLETIONs the reference decoder verifies under KEY, before any bad frame."""
    dec = wire.Decoder(wire.TO_REQUESTER, key=KEY)
    dec.feed(data)
    out = []
    try:
        for ev in dec.events():
            if not isinstance(ev, wire.Completion):
                break
            out.append(ev.batch_id)
    except ProtocolError:
        pass
    return out


def one_input(data: bytes) -> None:
    for keyed in (True, False):
        seen = _run(data, keyed)
        if keyed:  # C takes a completion only if the reference verifies it (C checks batch ids too)
            assert seen == _verified(data)[: len(seen)], f"C took {seen}, reference verifies {_verified(data)}"


def _run(data: bytes, keyed: bool) -> list[int]:
    ep = tcp.TcpEndpoint(spin_us=0)
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        ep._core.attach(ours.fileno())  # what TcpEndpoint._dial does after the handshake
        if keyed:
            ep._core.set_frame_key(KEY)
        ep._sock, ep._broken = ours, None
        lkey = ep.register_local(fixed.LOCAL, fixed.REGION_SIZE)
        for batch_id, spec in BATCHES:
            ep.post(_ops(lkey, spec), batch_id)
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)
        out = new_completions(4)
        seen = []
        for _ in range(8):
            try:
                n = ep.poll(out, 0.0)
            except (TransportError, ProtocolError):
                break
            for c in out[:n]:
                batch_id, spec = BATCHES[len(seen)]
                assert int(c["batch_id"]) == batch_id, f"completion {c} out of order"
                assert int(c["index"]) <= len(spec) and (int(c["status"]) != 0 or int(c["index"]) == len(spec)), c
                seen.append(c)
        else:
            raise AssertionError("poll neither failed nor reached the end of the stream")
    finally:
        ep.close()
        peer.close()
    assert fixed.guards_intact(MEM), "a READ scatter wrote outside the local buffer"
    return [int(c["batch_id"]) for c in seen]


driver.main(__name__, one_input)
