"""Raw sockets against a tcp provider: every bad frame gets a clear answer, and the provider
keeps serving a well-behaved client."""
from __future__ import annotations

import socket
import zlib

import numpy as np
import pytest

from rram import errors, transport
from rram.transport import OP_READ, OP_WRITE, new_ops, wire
from rram.transport.base import WC_REM_ACCESS_ERR, WC_REM_INV_REQ_ERR, WC_SUCCESS

pytestmark = pytest.mark.skipif(transport.unavailable_reason("tcp") is not None,
                                reason=str(transport.unavailable_reason("tcp")))
PAGE = 4096


@pytest.fixture
def provider():
    pt = transport.provider_transport("tcp")
    session = pt.open_session("raw")
    region = np.zeros(16 * PAGE, dtype=np.uint8)
    rkey = session.register(region.ctypes.data, region.size)
    yield pt, session, region, rkey
    pt.close()


def dial(session, token: bytes | None = None, secret: bytes | None = None) -> tuple[socket.socket, bytes]:
    """A connection that sent its HELLO, and the frame key it will have if the provider takes it."""
    params = session.accept({})
    sock = socket.create_connection((params["host"], params["port"]), timeout=5)
    challenge = read_event(sock)
    assert isinstance(challenge, wire.Challenge)
    token = token if token is not None else bytes.fromhex(params["token"])
    secret = secret if secret is not None else bytes.fromhex(params["session_secret"])
    sock.sendall(wire.hello(token, wire.hello_mac(secret, challenge.nonce, token)))
    return sock, wire.frame_key(secret, challenge.nonce, token)


def read_event(sock: socket.socket):
    """The next frame from the provider, or None when it closed the connection."""
    dec = wire.Decoder(wire.TO_REQUESTER)
    while (ev := dec.next_event()) is None:
        n = sock.recv_into(dec.writable())
        if n == 0:
            return None
        dec.wrote(n)
    if isinstance(ev, wire.Completion):
        return wire.Completion(ev.batch_id, ev.status, ev.index, bytes(ev.data))
    return ev


def hello_done(session) -> tuple[socket.socket, bytes]:
    sock, key = dial(session)
    assert isinstance(read_event(sock), wire.HelloOk)
    return sock, key


def one_op(region, rkey, offset=0, length=PAGE, opcode=OP_READ):
    ops = np.zeros(1, dtype=wire.WIRE_OP)
    ops[0] = (region.ctypes.data + offset, length, rkey, opcode, (0,) * 7)
    return ops


def assert_good_client_works(session, region, rkey):
    ep = transport.requester_transport("tcp").endpoint()
    try:
        ep.connect(session.accept(ep.local_params()))
        buf = np.frombuffer(np.random.default_rng(0).bytes(PAGE), dtype=np.uint8).copy()
        lkey = ep.register_local(buf.ctypes.data, buf.size)
        ops = new_ops(1)
        ops[0] = (buf.ctypes.data, region.ctypes.data + 3 * PAGE, PAGE, lkey, rkey, OP_WRITE, (0, 0, 0))
        ep.execute(ops, 1)
        assert zlib.crc32(region[3 * PAGE : 4 * PAGE]) == zlib.crc32(buf)
    finally:
        ep.close()


def expect_error(sock, code: int, words: str) -> None:
    ev = read_event(sock)
    assert isinstance(ev, wire.Error), ev
    assert ev.code == code and words in ev.message, ev
    assert read_event(sock) is None  # then the provider closed the connection
    sock.close()


BAD_FRAMES = {
    "wrong magic": (b"XXXX" + wire.header(wire.REQUEST, 1, 1)[4:], "bad magic"),
    "wrong version": (wire.header(wire.REQUEST, 1, 1)[:4] + b"\x07" + wire.header(wire.REQUEST, 1, 1)[5:], "version"),
    "huge count": (wire.header(wire.REQUEST, 1, 100_000), "1..4096"),
    "huge payload": (wire.header(wire.REQUEST, 1, 1, payload_len=2**32 - 1), "exceeds the limit"),
    "wrong type": (wire.completion(1, 0, 0), "unexpected frame COMPLETION"),
    "payload mismatch": (None, "does not match the WRITE lengths"),
    "reads over limit": (None, "reads"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_frame_gets_error_frame_and_close(provider, case):
    pt, session, region, rkey = provider
    frame, words = BAD_FRAMES[case]
    sock, key = hello_done(session)
    if case == "payload mismatch":
        frame = wire.request(1, one_op(region, rkey, opcode=OP_WRITE), b"short", key)
    elif case == "reads over limit":
        ops = np.concatenate([one_op(region, rkey, length=2**32 - 1)] * 20)
        frame = wire.request(1, ops, key=key)
    sock.sendall(frame)
    expect_error(sock, wire.E_BAD_FRAME, words)
    assert_good_client_works(session, region, rkey)
    assert pt.stats()["errors"] >= 1


def test_truncated_frame_then_close(provider):
    pt, session, region, rkey = provider
    sock, key = hello_done(session)
    sock.sendall(wire.request(1, one_op(region, rkey, opcode=OP_WRITE), bytes(PAGE), key)[:100])
    sock.shutdown(socket.SHUT_WR)
    expect_error(sock, wire.E_BAD_FRAME, "closed inside a frame")
    assert_good_client_works(session, region, rkey)


def test_garbage_hello_token(provider):
    pt, session, region, rkey = provider
    sock, _ = dial(session, token=b"\xee" * wire.TOKEN_SIZE)
    expect_error(sock, wire.E_BAD_TOKEN, "unknown or expired session token")
    sock = socket.create_connection(pt.address, timeout=5)
    assert isinstance(read_event(sock), wire.Challenge)  # first, so one read cannot swallow both frames
    sock.sendall(b"hello there, this is not a frame at all")
    expect_error(sock, wire.E_BAD_FRAME, "bad magic")
    assert_good_client_works(session, region, rkey)


def test_a_sniffed_token_or_a_replayed_hello_is_refused(provider):
    pt, session, region, rkey = provider
    params = session.accept({})
    token, secret = bytes.fromhex(params["token"]), bytes.fromhex(params["session_secret"])
    owner = socket.create_connection(pt.address, timeout=5)
    nonce = read_event(owner).nonce
    hello = wire.hello(token, wire.hello_mac(secret, nonce, token))
    owner.sendall(hello)
    assert isinstance(read_event(owner), wire.HelloOk)
    key = wire.frame_key(secret, nonce, token)
    # an eavesdropper has the token (and this HELLO) but not the secret
    thief = socket.create_connection(pt.address, timeout=5)
    assert isinstance(read_event(thief), wire.Challenge)
    thief.sendall(hello)  # replayed: the MAC is for another challenge
    expect_error(thief, wire.E_BAD_TOKEN, "not proven with its secret")
    thief = socket.create_connection(pt.address, timeout=5)
    nonce = read_event(thief).nonce
    thief.sendall(wire.hello(token, wire.hello_mac(b"guess" * 8, nonce, token)))
    expect_error(thief, wire.E_BAD_TOKEN, "not proven with its secret")
    # the owner's connection was not replaced: it still serves
    ops = np.zeros(1, wire.WIRE_OP)
    ops["remote_addr"], ops["length"], ops["rkey"] = region.ctypes.data, 8, rkey
    owner.sendall(wire.request(5, ops, key=key))
    ev = read_event(owner)
    assert isinstance(ev, wire.Completion) and ev.status == 0 and ev.batch_id == 5
    owner.close()


@pytest.mark.parametrize("offset,length,rkey_delta,status", [
    (0, PAGE, 1, WC_REM_ACCESS_ERR),            # bad key
    (15 * PAGE + 1, PAGE, 0, WC_REM_ACCESS_ERR),  # runs past the end
    (0, 0, 0, WC_REM_INV_REQ_ERR),               # empty op
    (0, wire.MAX_OP_LENGTH + 1, 0, WC_REM_INV_REQ_ERR),  # over the per-op limit
])
def test_bad_op_is_an_error_completion_and_connection_survives(provider, offset, length, rkey_delta, status):
    pt, session, region, rkey = provider
    sock, key = hello_done(session)
    region[:PAGE] = 7
    ops = np.concatenate([one_op(region, rkey), one_op(region, rkey ^ rkey_delta, offset, length)])
    sock.sendall(wire.request(5, ops, key=key, seq=0))
    ev = read_event(sock)
    assert (ev.batch_id, ev.status, ev.index) == (5, status, 1)
    assert ev.data == bytes([7]) * PAGE  # op 0 ran and its data came back
    sock.sendall(wire.request(6, one_op(region, rkey), key=key, seq=1))
    ev = read_event(sock)
    assert (ev.batch_id, ev.status, ev.index, len(ev.data)) == (6, WC_SUCCESS, 1, PAGE)
    sock.close()


def test_session_close_tells_the_client(provider):
    pt, session, region, rkey = provider
    sock, _ = hello_done(session)
    session.close()
    expect_error(sock, wire.E_SESSION_CLOSED, "closed")
    assert pt.stats()["regions"] == 0


def test_endpoint_reports_lost_connection_and_recovers(provider):
    pt, session, region, rkey = provider
    ep = transport.requester_transport("tcp").endpoint()
    try:
        ep.connect(session.accept({}))
        ep._sock.shutdown(socket.SHUT_RDWR)  # the network drops the connection
        buf = np.zeros(PAGE, dtype=np.uint8)
        ops = new_ops(1)
        ops[0] = (buf.ctypes.data, region.ctypes.data, PAGE, ep.register_local(buf.ctypes.data, PAGE), rkey,
                  OP_READ, (0, 0, 0))
        with pytest.raises(errors.ConnectionLost):
            ep.execute(ops, 1, timeout=5)
        with pytest.raises(errors.ConnectionLost):
            ep.post(ops, 2)
        ep.recover()
        region[:PAGE] = 3
        ep.execute(ops, 3, timeout=5)
        assert (buf == 3).all()
    finally:
        ep.close()


def test_requests_are_signed_in_order_and_an_altered_one_is_refused(provider):
    pt, session, region, rkey = provider
    sock, key = hello_done(session)
    sock.sendall(wire.request(1, one_op(region, rkey), key=key, seq=0))
    assert read_event(sock).status == WC_SUCCESS
    replay = wire.request(2, one_op(region, rkey), key=key, seq=1)
    sock.sendall(replay)
    assert read_event(sock).status == WC_SUCCESS
    sock.sendall(replay)  # the same frame again: its sequence number is spent
    expect_error(sock, wire.E_BAD_FRAME, "missing or bad MAC, or sequence number 1")
    sock, key = hello_done(session)
    frame = bytearray(wire.request(3, one_op(region, rkey), key=key, seq=0))
    frame[wire.HEADER.size] ^= 0x40  # an on-path attacker moves the op's remote address
    sock.sendall(bytes(frame))
    expect_error(sock, wire.E_BAD_FRAME, "missing or bad MAC")
    sock, key = hello_done(session)
    sock.sendall(wire.request(4, one_op(region, rkey)))  # not signed at all
    expect_error(sock, wire.E_BAD_FRAME, "missing or bad MAC")
    assert_good_client_works(session, region, rkey)
