"""The data-channel frames: round trips, limits, and fuzzing (only ProtocolError escapes)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram.errors import ProtocolError
from rram.transport import wire

ANY = wire.TO_PROVIDER | wire.TO_REQUESTER


def decode_all(data: bytes, accept=ANY, chunk: int | None = None) -> list:
    dec = wire.Decoder(accept)
    events = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        dec.feed(data[i : i + step])
        events.extend(materialize(ev) for ev in dec.events())
    return events


def materialize(ev):
    """Copy views out of the decoder buffer so events outlive the next feed."""
    if isinstance(ev, wire.Request):
        return ("req", ev.batch_id, ev.count, bytes(ev.ops), bytes(ev.payload))
    if isinstance(ev, wire.Completion):
        return ("comp", ev.batch_id, ev.status, ev.index, bytes(ev.data))
    return ev


def sample_ops(n: int) -> np.ndarray:
    ops = np.zeros(n, dtype=wire.WIRE_OP)
    ops["remote_addr"] = 0x7F0000000000 + np.arange(n) * 4096
    ops["length"] = 4096
    ops["rkey"] = 0x2001
    ops["opcode"] = 1
    return ops


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_frames_round_trip_in_any_chunking(chunk):
    ops = sample_ops(3)
    payload = bytes(range(256)) * 48
    token = bytes(range(32))
    nonce, mac = bytes(range(32, 64)), bytes(range(64, 96))
    stream = (wire.challenge(nonce) + wire.hello(token, mac) + wire.hello_ok(mac) + wire.request(7, ops, payload)
              + wire.completion(7, 10, 2, b"abc") + wire.error(wire.E_BAD_FRAME, "nope"))
    events = decode_all(stream, chunk=chunk)
    assert events == [
        wire.Challenge(nonce),
        wire.Hello(token, mac),
        wire.HelloOk(mac),
        ("req", 7, 3, ops.tobytes(), payload),
        ("comp", 7, 10, 2, b"abc"),
        wire.Error(wire.E_BAD_FRAME, "nope"),
    ]


def test_partial_frame_waits_for_more_bytes():
    frame = wire.request(1, sample_ops(1), b"x" * 4096)
    dec = wire.Decoder(wire.TO_PROVIDER)
    dec.feed(frame[:-1])
    assert dec.next_event() is None
    dec.feed(frame[-1:])
    assert isinstance(dec.next_event(), wire.Request)


def bad(header_fields: dict, accept=ANY) -> str:
    fields = dict(ftype=wire.REQUEST, batch_id=1, count=1, status=0, payload_len=0)
    fields.update(header_fields)
    with pytest.raises(ProtocolError) as exc:
        decode_all(wire.header(**fields), accept)
    return str(exc.value)


def test_limits_and_framing_errors_are_clear():
    assert "bad magic" in str(pytest.raises(ProtocolError, decode_all, b"GET / HTTP/1.1\r\n" * 2).value)
    assert "version" in str(pytest.raises(ProtocolError, decode_all, b"RRMD\x09" + bytes(27)).value)
    assert "1..4096" in bad({"count": wire.MAX_OPS + 1})
    assert "1..4096" in bad({"count": 0})
    assert "exceeds the limit" in bad({"payload_len": wire.MAX_PAYLOAD + 1})
    assert "exceeds the limit" in bad({"ftype": wire.COMPLETION, "payload_len": 2**32 - 1})
    assert "token" in bad({"ftype": wire.HELLO, "payload_len": 3})
    assert "token" in bad({"ftype": wire.HELLO, "payload_len": wire.TOKEN_SIZE})  # a token without its proof
    assert "nonce" in bad({"ftype": wire.CHALLENGE, "payload_len": 3})
    assert "unexpected frame COMPLETION" in bad({"ftype": wire.COMPLETION}, wire.TO_PROVIDER)
    assert "unknown type 77" in bad({"ftype": 77})
    assert "32-byte MAC" in bad({"ftype": wire.HELLO_OK, "payload_len": 5})


def test_decoder_does_not_allocate_ahead_of_the_bytes():
    dec = wire.Decoder(wire.TO_PROVIDER, initial=64)
    dec.feed(wire.header(wire.REQUEST, 1, 2, payload_len=wire.MAX_PAYLOAD))  # a legal 64 MiB announcement
    assert dec.next_event() is None
    assert len(dec._buf) < 1 << 16
    dec.feed(bytes(1 << 20))
    assert len(dec._buf) < 4 << 20


VALID = [
    wire.challenge(bytes(32)),
    wire.hello(bytes(32), bytes(32)),
    wire.request(3, sample_ops(2), b"p" * 8192),
    wire.completion(3, 0, 2, b"d" * 100),
    wire.error(wire.E_BAD_TOKEN, "bad token"),
    wire.hello_ok(bytes(32)),
]


def feed_checked(data: bytes, chunk: int) -> None:
    """Only ProtocolError may escape; the buffer never exceeds one legal frame plus slack."""
    dec = wire.Decoder(ANY, initial=64)
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i : i + chunk])
            for ev in dec.events():
                materialize(ev)
            assert len(dec._buf) <= 4 * (len(data) + 4096)
    except ProtocolError:
        pass


fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=2048), st.integers(1, 64))
def test_fuzz_random_bytes(data, chunk):
    feed_checked(data, chunk)


@fuzz
@given(st.sampled_from(VALID), st.data())
def test_fuzz_truncated_and_mutated_frames(frame, data):
    frame = bytearray(frame)
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    feed_checked(bytes(frame[:cut]) + bytes(frame), data.draw(st.integers(1, 512)))


@fuzz
@given(st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_fuzz_header_counts_and_lengths(ftype, count, payload_len):
    hdr = wire.HEADER.pack(wire.MAGIC, wire.VERSION, ftype, 0, 1, count, 0, payload_len, 0)
    feed_checked(hdr + bytes(64), 37)


def test_signed_requests_parse_and_the_c_mac_matches_the_reference():
    from rram._ext import _tcpwire

    key, ops = bytes(range(32)), sample_ops(3)
    frame = wire.request(9, ops, b"w" * 10, key=key, seq=41)
    h = wire.parse_header(frame, 0, wire.TO_PROVIDER)
    assert (h.flags, h.seq, h.body_len) == (wire.FLAG_MAC, 41, 3 * 24 + 10 + wire.MAC_TRAILER)
    ev = decode_all(frame, wire.TO_PROVIDER)[0]
    assert ev[4] == b"w" * 10  # the payload ends before the MAC
    signed = frame[: wire.HEADER.size + 3 * 24]
    assert frame[-wire.MAC_TRAILER :] == wire.request_mac(key, signed) == _tcpwire.frame_mac(key, signed)
    with pytest.raises(ProtocolError, match="unknown flags"):
        wire.parse_header(wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.ERROR, 1, 0, 0, 0, 0, 0))
    with pytest.raises(ProtocolError, match="unknown flags"):
        wire.parse_header(wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.COMPLETION, 2, 0, 0, 0, 0, 0))
