"""Fuzz the live NBD server from raw sockets: whatever a client sends, the server keeps serving.

Hypothesis builds handshake and request streams (valid pieces, corrupted pieces and noise);
each is sent on its own connection, then a well-behaved client must still negotiate, write
and read back its data, and no connection thread may be left behind.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram.frontends.nbd import protocol as P
from rram.frontends.nbd.backend import MemoryBackend
from rram.frontends.nbd.server import NBDServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SIZE = 4 << 20


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def go_data(name: str = "", infos=()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 1, data: bytes = b"") -> bytes:
    return P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return bytes(buf)


class GoodClient:
    """A minimal, correct NBD client: fixed newstyle, NBD_OPT_GO, simple replies."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        magic, opt_magic, _ = P.GREETING.unpack(recv_exact(self.sock, P.GREETING.size))
        assert (magic, opt_magic) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", 3) + opt(P.NBD_OPT_GO, go_data("rram")))
        while True:
            _, _, kind, length = struct.unpack(">QIII", recv_exact(self.sock, 20))
            recv_exact(self.sock, length)
            if kind == P.NBD_REP_ACK:
                break
            assert kind == P.NBD_REP_INFO

    def write_read(self, offset: int, data: bytes) -> bytes:
        self.sock.sendall(req(P.NBD_CMD_WRITE, offset, len(data), handle=1, data=data)
                          + req(P.NBD_CMD_READ, offset, len(data), handle=2))
        assert P.SIMPLE_REPLY.unpack(recv_exact(self.sock, 16)) == (P.NBD_SIMPLE_REPLY_MAGIC, 0, 1)
        assert P.SIMPLE_REPLY.unpack(recv_exact(self.sock, 16)) == (P.NBD_SIMPLE_REPLY_MAGIC, 0, 2)
        return recv_exact(self.sock, len(data))

    def close(self):
        self.sock.sendall(req(P.NBD_CMD_DISC))
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    tmp = tempfile.mkdtemp(prefix="rram-fuzz-")
    srv = NBDServer(MemoryBackend(SIZE), export_name="rram", handshake_timeout=1.0, max_block=256 << 10)
    srv.listen_unix(os.path.join(tmp, "nbd.sock"))
    srv.start()
    yield srv, os.path.join(tmp, "nbd.sock")
    srv.close()
    shutil.rmtree(tmp, ignore_errors=True)


def wait_idle(srv: NBDServer, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.active_connections and time.monotonic() < deadline:
        time.sleep(0.005)
    assert srv.active_connections == 0, "a connection thread outlived its client"


_handshake = st.one_of(
    st.just(struct.pack(">I", 3)), st.just(struct.pack(">I", 1)), st.binary(min_size=4, max_size=4))
_options = st.one_of(
    st.builds(opt, st.sampled_from([1, 2, 3, 5, 6, 7, 8, 10, 11, 99, 2**32 - 1]), st.binary(max_size=32)),
    st.builds(lambda n, i: opt(P.NBD_OPT_GO, go_data(n, i)), st.sampled_from(["", "rram", "bad"]),
              st.lists(st.integers(0, 4), max_size=3)),
    st.just(opt(P.NBD_OPT_STRUCTURED_REPLY)),
    st.binary(max_size=24),
)
_requests = st.one_of(
    st.builds(req, st.integers(0, 8), st.sampled_from([0, 1, 4096, SIZE - 4096, SIZE, 2**63]),
              st.sampled_from([0, 1, 4096, 300000, 2**32 - 1]), st.integers(0, 31), st.integers(0, 2**64 - 1)),
    st.builds(lambda o, d: req(P.NBD_CMD_WRITE, o, len(d), data=d), st.integers(0, SIZE), st.binary(max_size=600)),
    st.binary(max_size=40),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(hs=_handshake, options=st.lists(_options, max_size=4), go=st.booleans(),
       requests=st.lists(_requests, max_size=6), data=st.binary(min_size=1, max_size=5000))
def test_live_server_survives_any_stream(server, hs, options, go, requests, data):
    srv, path = server
    stream = hs + b"".join(options) + (opt(P.NBD_OPT_GO, go_data("rram")) if go else b"") + b"".join(requests)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        try:
            s.sendall(stream)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # the server answers what it can, then closes on EOF or garbage
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass  # it hung up on us first: fine
    good = GoodClient(path)
    offset = 12345 % (SIZE - len(data))
    assert good.write_read(offset, data) == data
    good.close()
    wait_idle(srv)


def test_silent_client_is_dropped_after_the_handshake_timeout(server):
    srv, path = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        recv_exact(s, P.GREETING.size)
        s.settimeout(5)
        t0 = time.monotonic()
        assert s.recv(1) == b""  # closed by the server, not by us
        assert time.monotonic() - t0 < 4
    good = GoodClient(path)
    assert good.write_read(0, b"still here") == b"still here"
    good.close()
    wait_idle(srv)


def test_many_clients_at_once_with_a_bad_one_among_them(server):
    srv, path = server
    clients = [GoodClient(path) for _ in range(6)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
        bad.connect(path)
        bad.sendall(struct.pack(">I", 3) + opt(P.NBD_OPT_GO, go_data("rram")) + b"\xde\xad" * 30)
        for i, c in enumerate(clients):
            payload = bytes([i]) * 8192
            assert c.write_read(i * 8192, payload) == payload
    for c in clients:
        c.close()
    wait_idle(srv)
    assert srv.counters["disconnected_bad_clients"] >= 1
