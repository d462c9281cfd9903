"""Control frames: encode/decode, every kind of malformed input, and fuzzing."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rram.control import messages as M
from rram.errors import ProtocolError


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def raw(obj) -> bytes:
    return frame(json.dumps(obj).encode())


VALID = [
    M.request("hello", 1, requester="r1", role="requester", generation=1, nonce="00" * 32),
    M.request("auth", 2, mac="ab" * 32),
    M.request("alloc_slab", 3, size=1 << 20),
    M.request("free_slab", 4, lease=7),
    M.request("connect", 5, params={"x": [1, 2]}),
    M.request("stats", 6),
    M.request("heartbeat", 7),
    M.request("resume", 8, session="s", token="t"),
    M.request("drain", 9),
    M.request("bye", 10),
]


def test_round_trip_and_chunking():
    stream = b"".join(M.encode(m) for m in VALID)
    assert M.Decoder().feed(stream) == VALID
    dec = M.Decoder()
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert got == VALID and dec.buffered == 0


def test_frame_layout():
    data = M.encode({"v": 1, "type": "stats", "id": 3})
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4 and json.loads(data[4:]) == {"v": 1, "type": "stats", "id": 3}


def test_replies():
    dec = M.Decoder("reply")
    ok = M.reply(3, lease=1, addr=4096, length=8192, rkey=9)
    err = M.error_reply(4, "capacity", "full")
    assert dec.feed(M.encode(ok) + M.encode(err)) == [ok, err]
    assert M.check_reply("alloc_slab", ok) is ok
    with pytest.raises(ProtocolError, match="alloc_slab reply is missing field 'rkey'"):
        M.check_reply("alloc_slab", M.reply(3, lease=1, addr=4096, length=8192))
    with pytest.raises(ProtocolError, match="error reply needs error"):
        dec.feed(raw({"v": 1, "re": 1, "ok": False, "error": "oops"}))
    with pytest.raises(ProtocolError, match="'ok' must be true or false"):
        M.Decoder("reply").feed(raw({"v": 1, "re": 1}))


@pytest.mark.parametrize("data,match", [
    (struct.pack(">I", M.MAX_FRAME + 1), "exceeds the 1048576-byte limit"),
    (struct.pack(">I", 0xFFFFFFFF) + b"{}", "frame length 4294967295 exceeds"),
    (frame(b"\xff\xfe{}"), "not valid UTF-8"),
    (frame(b"{not json"), "not valid JSON"),
    (frame(b'{"v": 1, "type": "stats", "id": NaN}'), "not valid JSON"),
    (raw([1, 2]), "must be a JSON object, got list"),
    (raw("hi"), "must be a JSON object, got str"),
    (raw({"type": "stats", "id": 1}), "no protocol version field 'v'"),
    (raw({"v": 2, "type": "stats", "id": 1}), "unsupported protocol version 2"),
    (raw({"v": True, "type": "stats", "id": 1}), "unsupported protocol version True"),
    (raw({"v": 1, "id": 1}), "request has no 'type' field"),
    (raw({"v": 1, "type": "stats"}), "request has no 'id' field"),
    (raw({"v": 1, "type": "stats", "id": -1}), "'id' must be a non-negative integer"),
    (raw({"v": 1, "type": "stats", "id": "1"}), "'id' must be a non-negative integer"),
    (raw({"v": 1, "type": 5, "id": 1}), "'type' must be a string"),
    (raw({"v": 1, "type": "format_disk", "id": 1}), "unknown request type 'format_disk'"),
    (raw({"v": 1, "type": "alloc_slab", "id": 1}), "alloc_slab request is missing field 'size'"),
    (raw({"v": 1, "type": "alloc_slab", "id": 1, "size": "1GiB"}), "field 'size' must be integer"),
    (raw({"v": 1, "type": "alloc_slab", "id": 1, "size": True}), "field 'size' must be integer"),
    (raw({"v": 1, "type": "free_slab", "id": 1, "lease": 1.5}), "field 'lease' must be integer"),
    (raw({"v": 1, "type": "connect", "id": 1, "params": []}), "field 'params' must be object"),
    (raw({"v": 1, "type": "stats", "id": 1, "verbose": 1}), "stats request has unknown field 'verbose'"),
])
def test_malformed_frames(data, match):
    with pytest.raises(ProtocolError, match=match):
        M.Decoder().feed(data)


def test_partial_frame_waits():
    data = M.encode(VALID[2])
    dec = M.Decoder()
    assert dec.feed(data[:3]) == [] and dec.feed(data[3:-1]) == []
    assert dec.buffered == len(data) - 1
    assert dec.feed(data[-1:]) == [VALID[2]]


def test_encode_refuses():
    with pytest.raises(ProtocolError, match="must be a dict"):
        M.encode([1])
    with pytest.raises(ProtocolError, match="cannot be encoded as JSON"):
        M.encode({"x": object()})
    with pytest.raises(ProtocolError, match="cannot be encoded as JSON"):
        M.encode({"x": float("nan")})
    with pytest.raises(ProtocolError, match="exceeds the 1048576-byte frame limit"):
        M.encode({"x": "a" * M.MAX_FRAME})
    with pytest.raises(ProtocolError, match="unknown request type"):
        M.request("nope", 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes_only_raise_protocol_error(data):
    for role in ("request", "reply", "any"):
        try:
            out = M.Decoder(role).feed(data)
        except ProtocolError:
            continue
        assert all(isinstance(m, dict) for m in out)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "type", "id", "size", "lease", "params", "re", "ok", "x"]),
                       json_values, max_size=6))
def test_fuzz_objects_are_checked_or_refused(obj):
    data = raw(obj)
    try:
        (msg,) = M.Decoder("request").feed(data)
    except ProtocolError:
        return
    # whatever passed is a well-formed request of a known type
    assert msg["v"] == 1 and msg["type"] in M.REQUESTS and isinstance(msg["id"], int)
    assert set(msg) - {"v", "type", "id"} == set(M.REQUESTS[msg["type"]])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(VALID), max_size=8), st.lists(st.integers(1, 64), max_size=20))
def test_fuzz_any_split_gives_the_same_messages(msgs, cuts):
    stream = b"".join(M.encode(m) for m in msgs)
    dec, got, pos = M.Decoder(), [], 0
    for cut in cuts:
        got += dec.feed(stream[pos : pos + cut])
        pos += cut
    got += dec.feed(stream[pos:])
    assert got == msgs
