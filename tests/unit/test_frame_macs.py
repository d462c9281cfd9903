"""Both directions of a tcp data connection are signed (wire version 2): the reference decoder
(rram/transport/wire.py) and the C cores (ext/_tcpwire.pyx) agree on every MAC, take a signed
stream whole, and refuse any altered, replayed, reordered, reflected or unsigned frame."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram import transport
from rram.errors import ProtocolError
from rram.transport import OP_READ, wire

_tcpwire = pytest.importorskip("rram._ext._tcpwire")
KEY = bytes(range(100, 132))
PAGE = 4096


def completions(n: int, key=KEY, first: int = 0) -> list[bytes]:
    return [wire.completion(10 + i, 0 if i % 3 else 12, i % 5, bytes([i]) * (16 * i), key=key, seq=first + i)
            for i in range(n)]


def decode(data: bytes, key=KEY, chunk: int = 7) -> tuple[list, ProtocolError | None]:
    """(events until the end or the first error, the error)."""
    dec = wire.Decoder(wire.TO_REQUESTER, initial=64, key=key)
    out = []
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i : i + chunk])
            out += [(ev.batch_id, ev.status, ev.index, bytes(ev.data)) for ev in dec.events()]
    except ProtocolError as exc:
        return out, exc
    return out, None


def test_c_and_python_derive_the_same_keys_and_macs():
    ckey = wire.completion_key(KEY)
    assert ckey == _tcpwire.completion_key(KEY) and ckey != KEY
    frame = wire.completion(5, 0, 1, b"x" * 40, key=KEY, seq=9)
    head = frame[: wire.HEADER.size]
    assert frame[-wire.MAC_TRAILER :] == wire.completion_mac(ckey, head) == _tcpwire.frame_mac(ckey, head)
    assert _tcpwire.FrameMac(ckey).mac(head) == _tcpwire.frame_mac(ckey, head)
    h = wire.parse_header(frame, 0, wire.TO_REQUESTER)
    assert (h.flags, h.seq, h.body_len) == (wire.FLAG_MAC, 9, 40 + wire.MAC_TRAILER)


def test_a_signed_stream_decodes_whole_and_an_unkeyed_decoder_skips_the_macs():
    stream = b"".join(completions(6))
    events, err = decode(stream)
    assert err is None and [e[0] for e in events] == list(range(10, 16))
    assert events == decode(stream, key=None)[0]  # the data ends before each MAC
    assert events[3][3] == bytes([3]) * 48


@pytest.mark.parametrize("case", ["replayed", "reordered", "unsigned", "reflected", "wrong key", "skipped"])
def test_the_decoder_refuses(case):
    """Each stream has one good frame first (two for the replay); nothing after it is taken."""
    frames = completions(3)
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.COMPLETION, wire.FLAG_MAC, 11, 1, 0, 0, 1)
    bad = {
        "replayed": frames[0] + frames[1] + frames[1],
        "reordered": frames[0] + frames[2] + frames[1],
        "unsigned": frames[0] + wire.completion(11, 0, 1),
        "reflected": frames[0] + head + wire.request_mac(KEY, head),  # the request key's MAC
        "wrong key": frames[0] + completions(2, key=wire.completion_key(KEY))[1],
        "skipped": frames[0] + frames[2],
    }[case]
    events, err = decode(bad)
    assert len(events) == (2 if case == "replayed" else 1) and isinstance(err, ProtocolError), (events, err)


def _covered(frames: list[bytes]) -> list[int]:
    """Offsets in the stream that a MAC covers or that are MACs: headers and trailers."""
    out, pos = [], 0
    for f in frames:
        out += range(pos, pos + wire.HEADER.size)
        out += range(pos + len(f) - wire.MAC_TRAILER, pos + len(f))
        pos += len(f)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_altered_header_or_mac_is_ever_taken(data):
    """Flip any bit of a header or a MAC: the decoder yields only frames before it, unchanged."""
    frames = completions(4)
    stream = bytearray(b"".join(frames))
    good, _ = decode(bytes(stream))
    pos = data.draw(st.sampled_from(_covered(frames)))
    stream[pos] ^= 1 << data.draw(st.integers(0, 7))
    events, _err = decode(bytes(stream), chunk=data.draw(st.integers(1, 200)))
    assert events == good[: len(events)]
    hit = next(i for i, end in enumerate(np.cumsum([len(f) for f in frames])) if pos < end)
    assert len(events) <= hit


# -- the C cores ---------------------------------------------------------------------------------


class Pair:
    """A WireServer serving a region in a thread and a WireRequester, on a socketpair; the
    server's wait for requests polls up to ``spin_ns`` (tests/unit/test_tcp_spin.py)."""

    def __init__(self, key=KEY, first: int = 0, server_key=KEY, spin_ns: int = 0):
        from rram._ext import _regions

        self.ours, self.theirs = socket.socketpair()
        self.table, self.local = _regions.RegionTable(), _regions.RegionTable()
        self.region = np.arange(4 * PAGE, dtype=np.uint32).view(np.uint8)[: 4 * PAGE].copy()
        self.buf = np.zeros(4 * PAGE, np.uint8)
        self.rkey = self.table.register(self.region.ctypes.data, self.region.nbytes)
        self.lkey = self.local.register(self.buf.ctypes.data, self.buf.nbytes)
        self.server = _tcpwire.WireServer(self.theirs.fileno(), None)
        self.server.spin_ns = spin_ns
        self.core = _tcpwire.WireRequester(self.local, 8, 64)
        self.ours.setblocking(False)
        self.core.attach(self.ours.fileno())
        self.server.set_frame_key(server_key, first)
        self.core.set_frame_key(key, first)
        self.result = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.result = self.server.serve(self.table)

    def read(self, batch: int, page: int = 0):
        ops = transport.new_ops(1)
        ops[0] = (self.buf.ctypes.data + page * PAGE, self.region.ctypes.data + page * PAGE, PAGE, self.lkey,
                  self.rkey, OP_READ, 0)
        rc = self.core.post(ops, batch)
        if rc:
            return rc
        comp = transport.new_completions(1)
        n = self.core.poll(comp, 1.0)
        return n if n <= 0 else (int(comp[0]["batch_id"]), int(comp[0]["status"]))

    def close(self):
        self.core.detach()
        self.ours.close()
        self.thread.join(timeout=5)
        self.server.mark_closed()
        self.server.release()
        self.theirs.close()


def test_signed_round_trips_bring_the_bytes():
    p = Pair()
    try:
        for i in range(4):
            assert p.read(i + 1, i) == (i + 1, 0)
        assert np.array_equal(p.buf, p.region)
    finally:
        p.close()
    assert p.result == _tcpwire.R_EOF


def test_a_provider_with_another_key_runs_nothing():
    p = Pair(server_key=bytes(32))
    try:
        assert p.read(1) == 0  # nothing completes (a provider then sends ERROR and closes)
        p.thread.join(timeout=5)
        assert p.result == _tcpwire.R_BAD_MAC and p.server.detail()[:2] == (0, 0)
    finally:
        p.close()


def test_numbers_end_before_they_wrap():
    """The last number is used, then the requester refuses to post (the connection is replaced);
    a provider never takes a frame numbered SEQ_END either."""
    p = Pair(first=wire.SEQ_END - 1)
    try:
        assert p.read(1) == (1, 0)
        assert p.read(2) == _tcpwire.R_SEQ_END
        assert p.core.detail()[0] == wire.SEQ_END
    finally:
        p.close()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        server = _tcpwire.WireServer(theirs.fileno(), None)
        server.set_frame_key(KEY, wire.SEQ_END)
        ops = np.zeros(1, dtype=wire.WIRE_OP)
        ops[0] = (1 << 40, 8, 5, OP_READ, (0,) * 7)
        ours.sendall(wire.request(1, ops, key=KEY, seq=wire.SEQ_END))
        from rram._ext import _regions

        assert server.serve(_regions.RegionTable()) == _tcpwire.R_BAD_MAC
        server.mark_closed()
        server.release()


def test_the_requester_words_each_new_failure():
    from rram.transport import tcp

    ep = tcp.TcpEndpoint()
    try:
        assert "used up" in ep.c_failure(_tcpwire.R_SEQ_END, 0)
        assert "missing or bad MAC" in ep.c_failure(_tcpwire.R_BAD_MAC, 0)
    finally:
        ep.close()
