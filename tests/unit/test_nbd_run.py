"""The C run parser (RequestRun via ServerConnection.take_run) against the Python parser.

Whatever the byte stream, parsing with take_run first must yield the same requests, in the
same order, with the same payloads, and the same error replies, as next_event alone; and the
replies a run packs must decode like the sans-IO module's own.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram._ext._nbdwire import RequestRun
from rram.frontends.nbd import protocol as P

SIZE = 1 << 20
PAGE = 4096
MAX_PAGES = 16


def _handshake(structured: bool) -> bytes:
    name = b"rram"
    go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, P.NBD_INFO_BLOCK_SIZE)
    out = struct.pack(">I", 3)
    if structured:
        out += struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_STRUCTURED_REPLY, 0)
    return out + struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, len(go)) + go


def _req(cmd, offset, length, flags, handle, fill=0):
    data = bytes([(handle + i) & 0xFF for i in range(length)]) if cmd == P.NBD_CMD_WRITE and length < 1 << 20 else b""
    return P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


_offsets = st.sampled_from([0, PAGE, 5 * PAGE, 512, SIZE - PAGE, SIZE, SIZE - 2 * PAGE, 2**63])
_lengths = st.sampled_from([PAGE, 2 * PAGE, 3 * PAGE, 0, 512, 4 * PAGE + 512, MAX_PAGES * PAGE, 20 * PAGE])
_request = st.builds(_req, st.sampled_from([0, 0, 1, 1, 1, 3, 4, 6, 9]), _offsets, _lengths,
                     st.sampled_from([0, 0, 0, 1, 2, 4, 8]), st.integers(0, 2**64 - 1))


def _export():
    return P.Export(name="rram", size=SIZE, max_block=64 * PAGE)


def _drive(stream: bytes, step: int, structured: bool, use_runs: bool):
    """Feed ``stream`` in ``step``-byte pieces; the requests seen and the bytes sent back."""
    conn = P.ServerConnection(_export(), initial_buffer=4096)
    run = RequestRun(MAX_PAGES, structured) if use_runs else None
    seen, sent = [], bytearray()
    error = None
    try:
        for i in range(0, len(stream), step):
            conn.receive_data(stream[i:i + step])
            while True:
                if use_runs and conn.in_transmission and conn.take_run(run):
                    for k in range(run.nreq):
                        cmd, flags, handle, offset, length, data = run.request(k)
                        seen.append((cmd, flags, handle, offset, length, bytes(data) if data is not None else None))
                    run.clear()
                    continue
                ev = conn.next_event()
                sent += conn.data_to_send()
                if ev is P.NEED_DATA or isinstance(ev, P.Closed):
                    break
                if isinstance(ev, P.Request):
                    seen.append((ev.command, ev.flags, ev.handle, ev.offset, ev.length,
                                 bytes(ev.data) if ev.data is not None else None))
            if isinstance(ev, P.Closed):
                break
    except P.StreamError as exc:
        error = str(exc)
    return seen, bytes(sent), error


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_request, max_size=30), st.integers(1, 200), st.booleans(), st.booleans())
def test_runs_see_what_the_python_parser_sees(requests, step, structured, garbage):
    stream = _handshake(structured) + b"".join(requests) + (b"\xde\xad" * 20 if garbage else b"")
    assert _drive(stream, step, structured, True) == _drive(stream, step, structured, False)


def test_a_run_stops_at_another_command_and_at_an_overlapping_write():
    conn = P.ServerConnection(_export())
    conn.receive_data(_handshake(False))
    assert isinstance(conn.next_event(), P.Ready)
    conn.data_to_send()
    run = RequestRun(MAX_PAGES, False)
    stream = (_req(1, 0, PAGE, 0, 1) + _req(1, PAGE, 2 * PAGE, 1, 2) + _req(1, 2 * PAGE, PAGE, 0, 3)
              + _req(0, 0, PAGE, 0, 4))
    conn.receive_data(stream)
    assert conn.take_run(run) == 2  # the third write overlaps the second
    assert (run.command, run.nreq, run.npages, run.fua) == (P.NBD_CMD_WRITE, 2, 3, True)
    assert list(run.pages[:3]) == [0, 1, 2]
    run.clear()
    assert conn.take_run(run) == 1 and run.command == P.NBD_CMD_WRITE
    run.clear()
    assert conn.take_run(run) == 1 and run.command == P.NBD_CMD_READ


@pytest.mark.parametrize("structured", [False, True])
def test_packed_replies_decode_like_the_protocol_module(structured):
    run = RequestRun(MAX_PAGES, structured)
    stream = _req(0, 3 * PAGE, PAGE, 0, 0x1122334455667788) + _req(0, 8 * PAGE, 2 * PAGE, 1, 9)
    buf = bytearray(stream)
    assert run.parse(buf, 0, len(buf), SIZE, SIZE, 1) == len(buf)
    run.data[:3 * PAGE] = list(range(256)) * 48
    out = bytes(run.read_replies())
    conn = P.ServerConnection(_export())
    conn.structured = structured
    expect = bytearray()
    for handle, offset, length, page in ((0x1122334455667788, 3 * PAGE, PAGE, 0), (9, 8 * PAGE, 2 * PAGE, 1)):
        header = bytearray(conn.read_header_size)
        conn.pack_read_header(header, P.Request(P.NBD_CMD_READ, 0, handle, offset, length))
        expect += header + bytes(run.data[page * PAGE:page * PAGE + length])
    assert out == bytes(expect)
    writes = RequestRun(MAX_PAGES, structured)
    wbuf = bytearray(_req(1, 0, PAGE, 0, 5) + _req(1, PAGE, PAGE, 0, 6))
    writes.parse(wbuf, 0, len(wbuf), SIZE, SIZE, 1)
    assert bytes(writes.write_replies()) == P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, 5) \
        + P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, 6)


def test_parse_rejects_a_bad_range():
    run = RequestRun(4, False)
    with pytest.raises(ValueError):
        run.parse(bytearray(10), 5, 11, SIZE, SIZE, 1)
    with pytest.raises(ValueError):
        RequestRun(0, False)


def _run_of(requests: list[bytes], structured: bool) -> RequestRun:
    run = RequestRun(MAX_PAGES, structured)
    buf = bytearray(b"".join(requests))
    assert run.parse(buf, 0, len(buf), SIZE, SIZE, 1) == len(buf)
    return run


@settings(max_examples=100, deadline=None)
@given(cmd=st.sampled_from([P.NBD_CMD_READ, P.NBD_CMD_WRITE]), n=st.integers(1, 6), data=st.data())
def test_dropping_served_requests_leaves_the_run_of_the_rest(cmd, n, data):
    """The C loop drops the requests it served before a decline: the rest must be the run
    that parsing them alone gives (requests, pages, payloads, FUA)."""
    lengths = data.draw(st.lists(st.integers(1, 2), min_size=n, max_size=n))
    flags = data.draw(st.lists(st.sampled_from([0, P.NBD_CMD_FLAG_FUA]), min_size=n, max_size=n))
    k = data.draw(st.integers(0, n))
    reqs, offset = [], 0
    for i in range(n):
        reqs.append(_req(cmd, offset, lengths[i] * PAGE, flags[i], 100 + i))
        offset += lengths[i] * PAGE
    run = _run_of(reqs, False)
    run.drop(k)
    if k == n:
        assert (run.nreq, run.npages, run.command) == (0, 0, -1)
        return
    rest = _run_of(reqs[k:], False)
    assert (run.command, run.nreq, run.npages, run.fua) == (rest.command, rest.nreq, rest.npages, rest.fua)
    assert list(run.pages[:run.npages]) == list(rest.pages[:rest.npages])
    assert [run.request(i)[:5] for i in range(run.nreq)] == [rest.request(i)[:5] for i in range(rest.nreq)]
    if cmd == P.NBD_CMD_WRITE:
        assert bytes(run.data[:run.npages * PAGE]) == bytes(rest.data[:rest.npages * PAGE])
    with pytest.raises(IndexError):
        run.drop(run.nreq + 1)
