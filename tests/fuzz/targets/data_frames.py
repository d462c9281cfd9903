"""Fuzz target: tcp data frames through the reference decoder (rram/transport/wire.py).

The bytes go to a Decoder of each side, without and with the frame key of seeds.py (which
verifies signed REQUESTs and COMPLETIONs), once through ``feed`` and once received in small
pieces through ``writable``/``wrote``; both must yield the same events.  Only ProtocolError may
escape; the buffer never grows past what a checked header announced.
"""
from __future__ import annotations

from tests.fuzz import driver

with driver.instrumented():
    from rram.transport import wire
from rram.errors import ProtocolError


def _events(dec: wire.Decoder) -> list:
    out = []
    for ev in dec.events():
        if isinstance(ev, wire.Request):
            assert 1 <= ev.count <= wire.MAX_OPS and len(ev.ops) == ev.count * wire.WIRE_OP.itemsize
            out.append((ev.batch_id, bytes(ev.ops), bytes(ev.payload)))
        elif isinstance(ev, wire.Completion):
            out.append((ev.batch_id, ev.status, ev.index, bytes(ev.data)))
        else:
            assert isinstance(ev, (wire.Hello, wire.HelloOk, wire.Challenge, wire.Error)), ev
            if isinstance(ev, wire.Error):
                ev.describe()
            out.append(ev)
    return out


KEY = bytes(range(32))  # seeds.py signs with it


def _whole(accept, key, data: bytes):
    dec = wire.Decoder(accept, initial=64, key=key)
    dec.feed(data)
    return _events(dec)


def _pieces(accept, key, data: bytes, step: int):
    dec = wire.Decoder(accept, initial=64, key=key)
    out = []
    pos = 0
    while pos < len(data):
        room = dec.writable(16)
        n = min(len(room), step, len(data) - pos)
        room[:n] = data[pos : pos + n]
        dec.wrote(n)
        pos += n
        out += _events(dec)
        # the buffer grows with the bytes received (doubling at most), never toward an announced length
        assert len(dec._buf) <= 2 * (pos + 64), f"{len(dec._buf)}-byte buffer after {pos} bytes"
    return out


def one_input(data: bytes) -> None:
    step = 1 + (data[-1] % 61 if data else 0)
    for accept, key in ((a, k) for a in (wire.TO_PROVIDER, wire.TO_REQUESTER) for k in (None, KEY)):
        try:
            whole = _whole(accept, key, data)
            err = None
        except ProtocolError as exc:
            whole, err = None, str(exc)
        try:
            pieces = _pieces(accept, key, data, step)
            assert err is None, f"whole feed failed ({err}) but piecewise did not"
            assert pieces == whole, "feed and writable/wrote disagree"
        except ProtocolError as exc:
            assert err == str(exc), f"whole feed gave {err!r}, piecewise {exc!r}"


driver.main(__name__, one_input)
