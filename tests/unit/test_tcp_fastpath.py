"""The tcp transport's C live path: pipelining without deadlock, counters, and how the requester
treats a provider that sends bad completions (a clear ConnectionLost, never a hang)."""
from __future__ import annotations

import socket
import threading
import time
import zlib

import numpy as np
import pytest

from rram import errors, transport
from rram.transport import OP_READ, OP_WRITE, new_completions, new_ops, wire

pytestmark = pytest.mark.skipif(transport.unavailable_reason("tcp") is not None,
                                reason=str(transport.unavailable_reason("tcp")))
PAGE = 4096


SECRET = bytes(range(32))  # the fake provider's session secret

def crc(a) -> int:
    return zlib.crc32(memoryview(a).cast("B"))


@pytest.fixture(params=[0, 20], ids=["block", "spin"])
def link(request):
    pt = transport.provider_transport("tcp", spin_us=request.param)
    session = pt.open_session("fast")
    remote = np.zeros(8 << 20, dtype=np.uint8)
    rkey = session.register(remote.ctypes.data, remote.size)
    ep = transport.requester_transport("tcp", spin_us=request.param).endpoint()
    ep.connect(session.accept({}))
    local = np.frombuffer(np.random.default_rng(1).bytes(16 << 20), dtype=np.uint8).copy()
    lkey = ep.register_local(local.ctypes.data, local.size)
    yield pt, ep, local, lkey, remote, rkey
    ep.close()
    pt.close()


def test_pipelined_mixed_batches_bigger_than_the_socket_buffers(link):
    """Each batch writes 128 pages and reads 128: the replies pile up while post() is still
    sending, so post must take them in or both sides would block."""
    pt, ep, local, lkey, remote, rkey = link
    remote[:] = np.frombuffer(np.random.default_rng(2).bytes(remote.size), dtype=np.uint8)
    want_remote = crc(remote)
    per = 128
    depth = ep.max_outstanding
    for k in range(depth):
        ops = new_ops(2 * per)
        idx = np.arange(per, dtype=np.uint64)
        ops[:per] = [(0, 0, PAGE, lkey, rkey, OP_WRITE, (0, 0, 0))] * per
        ops["local_addr"][:per] = local.ctypes.data + (k * per + idx) * PAGE  # to remote[4 MiB + ...]
        ops["remote_addr"][:per] = remote.ctypes.data + (4 << 20) + ((k * per + idx) % 1024) * PAGE
        ops[per:] = [(0, 0, PAGE, lkey, rkey, OP_READ, (0, 0, 0))] * per
        ops["local_addr"][per:] = local.ctypes.data + (8 << 20) + (k % 8 * per + idx) * PAGE
        ops["remote_addr"][per:] = remote.ctypes.data + (k % 8 * per + idx) * PAGE
        ep.post(ops, k)
    out = new_completions(depth)
    seen = []
    while len(seen) < depth:
        n = ep.poll(out, timeout=10)
        assert n, "no completion within 10 s"
        assert (out["status"][:n] == 0).all()
        seen += out["batch_id"][:n].tolist()
    assert seen == list(range(depth))
    assert crc(local[8 << 20 : (8 << 20) + (4 << 20)]) == crc(remote[: 4 << 20])
    last = (depth - 8) * per * PAGE  # the final 8 batches wrote the last copy of each 4 MiB slot
    assert crc(remote[4 << 20 :]) == crc(local[last : last + (4 << 20)])
    assert want_remote != crc(remote)


def test_non_contiguous_ops_and_counters(link):
    pt, ep, local, lkey, remote, rkey = link
    ops = new_ops(8)
    ops[:] = [(local.ctypes.data + i * PAGE, remote.ctypes.data + i * PAGE, PAGE, lkey, rkey, OP_WRITE, (0, 0, 0))
              for i in range(8)]
    ep.execute(ops[::2], 1)  # a strided view is copied, not refused
    assert crc(remote[:PAGE]) == crc(local[:PAGE])
    assert crc(remote[2 * PAGE : 3 * PAGE]) == crc(local[2 * PAGE : 3 * PAGE])
    assert not remote[PAGE : 2 * PAGE].any()
    s = pt.stats()
    assert (s["batches"], s["ops"], s["bytes_written"], s["connections"]) == (1, 4, 4 * PAGE, 1)
    ep.close()
    for _ in range(200):  # the connection thread folds its counters in as it ends
        if pt.stats()["connections"] == 0:
            break
        threading.Event().wait(0.01)
    s = pt.stats()
    assert (s["batches"], s["ops"], s["connections"]) == (1, 4, 0)


def test_bad_batch_sizes_are_refused_without_breaking_the_endpoint(link):
    pt, ep, local, lkey, remote, rkey = link
    with pytest.raises(errors.TransportError, match="1..4096"):
        ep.post(new_ops(0), 1)
    big = new_ops(80)
    big[:] = [(local.ctypes.data, remote.ctypes.data, wire.MAX_OP_LENGTH, lkey, rkey, OP_READ, (0, 0, 0))] * 80
    with pytest.raises(errors.TransportError, match="tcp limit"):
        ep.post(big, 2)
    with pytest.raises(errors.TransportError, match="COMPLETION_DTYPE"):
        ep.poll(np.zeros(1, dtype=np.uint64), 0)
    ep.execute(big[:1], 3)
    assert crc(local[: wire.MAX_OP_LENGTH]) == crc(remote[: wire.MAX_OP_LENGTH])


# -- a fake provider that answers with crafted frames -------------------------------------------


def fake_provider(reply: bytes):
    """Serve one connection: HELLO -> HELLO_OK, then answer the first REQUEST with ``reply``."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def run():
        conn, _ = lsock.accept()
        with conn:
            f = conn.makefile("rb")
            nonce = bytes(wire.NONCE_SIZE)
            conn.sendall(wire.challenge(nonce))
            f.read(wire.HEADER.size + wire.TOKEN_SIZE + wire.MAC_SIZE)
            conn.sendall(wire.hello_ok(wire.hello_ok_mac(SECRET, nonce, bytes(wire.TOKEN_SIZE))))
            h = wire.parse_header(f.read(wire.HEADER.size), 0, wire.TO_PROVIDER)
            f.read(h.body_len)
            conn.sendall(reply)
            conn.shutdown(socket.SHUT_WR)
            f.read()  # until the requester hangs up

    t = threading.Thread(target=run, daemon=True)
    t.start()
    params = {"host": "127.0.0.1", "port": lsock.getsockname()[1], "token": bytes(wire.TOKEN_SIZE).hex(),
              "session_secret": SECRET.hex()}
    return params, lsock, t


#: the frame key the endpoint derives from the fake provider's all-zero nonce and token
KEY = wire.frame_key(SECRET, bytes(wire.NONCE_SIZE), bytes(wire.TOKEN_SIZE))


def signed(batch_id, status, index, data=b"", seq=0) -> bytes:
    return wire.completion(batch_id, status, index, data, key=KEY, seq=seq)


def _flip_status(frame: bytes) -> bytes:
    """What an on-path attacker does to make a failed batch look done (or the reverse)."""
    out = bytearray(frame)
    out[20] ^= 0x0A
    return bytes(out)


def _reflected() -> bytes:
    """A completion carrying the MAC its header would have as a REQUEST (the request key)."""
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.COMPLETION, wire.FLAG_MAC, 7, 1, 0, PAGE, 0)
    return head + bytes(PAGE) + wire.request_mac(KEY, head)


MAC_WORDS = "missing or bad MAC"
BAD_REPLIES = {
    "wrong batch": (signed(99, 0, 1, bytes(PAGE)), "completion for batch 99 while expecting 7"),
    "too much data": (signed(7, 0, 1, bytes(2 * PAGE)), "carries 8192 bytes"),
    "too little data": (signed(7, 0, 1, bytes(10)), "carries 10 bytes"),
    "index past the batch": (signed(7, 10, 5, b""), "names op 5 of 1"),
    "error frame": (wire.error(wire.E_SHUTDOWN, "bye"), "provider shutting down: bye"),
    "bad magic": (b"JUNK" + signed(7, 0, 1)[4:], "bad magic"),
    "old version": (signed(7, 0, 1, bytes(PAGE))[:4] + b"\x01" + signed(7, 0, 1, bytes(PAGE))[5:],
                    "unsupported data protocol version 1, this side speaks 2"),
    "request to requester": (wire.request(7, np.zeros(1, dtype=wire.WIRE_OP)), "unexpected frame REQUEST"),
    "hello ok again": (wire.hello_ok(bytes(wire.MAC_SIZE)), "HELLO_OK"),
    "closed mid frame": (signed(7, 0, 1, bytes(PAGE))[:100], "closed the data connection"),
    # the provider -> requester direction is signed: none of these is ever taken as a result
    "unsigned": (wire.completion(7, 0, 1, bytes(PAGE)), MAC_WORDS),
    "status flipped": (_flip_status(signed(7, 0, 1, bytes(PAGE))), MAC_WORDS),
    "failure turned into success": (_flip_status(signed(7, 10, 0)), MAC_WORDS),
    "out of sequence": (signed(7, 0, 1, bytes(PAGE), seq=1), "numbered 1"),
    "MAC truncated": (signed(7, 0, 1, bytes(PAGE))[:-8] + signed(8, 0, 1, bytes(PAGE), seq=1), MAC_WORDS),
    "request MAC reflected": (_reflected(), MAC_WORDS),
    "signed under another key": (wire.completion(7, 0, 1, bytes(PAGE), key=wire.completion_key(KEY)), MAC_WORDS),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_completion_is_connection_lost_with_the_reason(case):
    reply, words = BAD_REPLIES[case]
    params, lsock, t = fake_provider(reply)
    ep = transport.requester_transport("tcp").endpoint()
    try:
        ep.connect(params)
        buf = np.zeros(PAGE, dtype=np.uint8)
        ops = new_ops(1)
        ops[0] = (buf.ctypes.data, 1 << 40, PAGE, ep.register_local(buf.ctypes.data, PAGE), 5, OP_READ, (0, 0, 0))
        ep.post(ops, 7)
        with pytest.raises(errors.ConnectionLost, match=words):
            ep.poll(new_completions(1), timeout=5)
        with pytest.raises(errors.ConnectionLost):
            ep.post(ops, 8)
    finally:
        ep.close()
        lsock.close()
        t.join(timeout=5)


def test_completions_parsed_before_a_bad_frame_are_handed_over():
    """One poll that parses a good completion and then meets a forged one returns the good one;
    the next poll reports the forgery (nothing parsed is dropped, nothing forged is taken)."""
    params, lsock, t = fake_provider(signed(7, 0, 1, bytes(range(256)) * 16)
                                     + _flip_status(signed(8, 0, 1, bytes(PAGE), seq=1)))
    ep = transport.requester_transport("tcp").endpoint()
    try:
        ep.connect(params)
        buf = np.zeros(2 * PAGE, dtype=np.uint8)
        lkey = ep.register_local(buf.ctypes.data, buf.size)
        for i, batch in enumerate((7, 8)):
            ops = new_ops(1)
            ops[0] = (buf.ctypes.data + i * PAGE, 1 << 40, PAGE, lkey, 5, OP_READ, (0, 0, 0))
            ep.post(ops, batch)
        out = new_completions(2)
        deadline = time.monotonic() + 5
        n = 0
        while n == 0 and time.monotonic() < deadline:
            n = ep.poll(out, timeout=0.1)
        assert n == 1 and int(out[0]["batch_id"]) == 7 and int(out[0]["status"]) == 0
        assert bytes(buf[:PAGE]) == bytes(range(256)) * 16
        with pytest.raises(errors.ConnectionLost, match=MAC_WORDS):
            ep.poll(out, timeout=5)
        assert not buf[PAGE:].any()
    finally:
        ep.close()
        lsock.close()
        t.join(timeout=5)
