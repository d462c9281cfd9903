"""The NBD server's batch path: pipelined requests, served in runs, answer like one by one.

A raw client writes many requests in one send, so the server finds them together in its
receive buffer and batches them; every reply is checked against a bytearray reference model
(sha256 of the data), and replies may come in any order (NBD matches them by handle).
"""
from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import threading
import time

import numpy as np
import pytest

from rram import errors
from rram.frontends.nbd import protocol as P
from rram.frontends.nbd.backend import MemoryBackend
from rram.frontends.nbd.server import MAX_BATCH_PAGES, NBDServer
from rram.testing.inproc import export_backend

PAGE = 4096
SIZE = 256 * PAGE


@pytest.fixture(params=["memory", "pagestore"])
def backend(request):
    with export_backend(request.param, SIZE) as b:
        yield b


class Client:
    """Fixed-newstyle handshake (NBD_OPT_GO), then raw pipelined requests."""

    def __init__(self, path: str, structured: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.structured = structured
        self._recv(P.GREETING.size)
        self.sock.sendall(P.CLIENT_FLAGS.pack(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES))
        if structured:
            self.sock.sendall(P.OPTION.pack(P.IHAVEOPT, P.NBD_OPT_STRUCTURED_REPLY, 0))
            self._option_reply()
        go = struct.pack(">IH", 0, 0)
        self.sock.sendall(P.OPTION.pack(P.IHAVEOPT, P.NBD_OPT_GO, len(go)) + go)
        while self._option_reply() != P.NBD_REP_ACK:
            pass

    def send(self, burst: bytes) -> threading.Thread:
        """Send from a thread: the server's replies must be read while a big burst goes out,
        or both ends block in send with full socket buffers.  Join it after the replies."""
        sender = threading.Thread(target=self.sock.sendall, args=(burst,), daemon=True)
        sender.start()
        return sender

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "server closed the connection"
            buf += chunk
        return bytes(buf)

    def _option_reply(self) -> int:
        _, _, kind, length = P.OPTION_REPLY.unpack(self._recv(P.OPTION_REPLY.size))
        self._recv(length)
        return kind

    @staticmethod
    def request(cmd: int, handle: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> bytes:
        return P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length) + data

    def reply(self, read_lengths: dict[int, int]) -> tuple[int, int, bytes]:
        """(handle, error, data) of the next reply; ``read_lengths`` maps READ handles to lengths."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:  # non-READ replies are simple even when structured
            error, handle = struct.unpack(">IQ", self._recv(P.SIMPLE_REPLY.size - 4))
            n = read_lengths.get(handle, 0) if error == 0 and not self.structured else 0
            return handle, error, self._recv(n)
        assert magic == P.NBD_STRUCTURED_REPLY_MAGIC
        flags, kind, handle, length = struct.unpack(">HHQI", self._recv(P.STRUCTURED_REPLY.size - 4))
        assert flags & P.NBD_REPLY_FLAG_DONE
        payload = self._recv(length)
        if kind == P.NBD_REPLY_TYPE_OFFSET_DATA:
            return handle, 0, payload[8:]
        if kind in (P.NBD_REPLY_TYPE_ERROR, P.NBD_REPLY_TYPE_ERROR_OFFSET):
            return handle, struct.unpack_from(">I", payload)[0], b""
        return handle, 0, b""

    def close(self) -> None:
        self.sock.sendall(self.request(P.NBD_CMD_DISC, 0))
        self.sock.close()


@pytest.fixture(params=[0, 50], ids=["recv-blocks", "recv-polls"])
def server(backend, tmp_path, request):
    with NBDServer(backend, export_name="", spin_us=request.param) as srv:
        srv.listen_unix(str(tmp_path / "nbd.sock"))
        srv.start()
        yield srv, str(tmp_path / "nbd.sock")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _page(rng: random.Random) -> bytes:
    # half-compressible, so the store really compresses and stores (not zero pages)
    return rng.randbytes(PAGE // 2) + bytes([rng.randrange(256)]) * (PAGE // 2)


def _run_pipelined(client: Client, model: bytearray, rng: random.Random, n_requests: int) -> None:
    """Send n_requests mixed requests in one burst; check every reply against ``model``."""
    burst, expect, lengths = bytearray(), {}, {}
    for handle in range(1, n_requests + 1):
        roll = rng.random()
        block = rng.randrange(SIZE // PAGE - 4)
        if roll < 0.40:  # one block write, sometimes FUA, often to a block written just before
            data = _page(rng)
            burst += client.request(P.NBD_CMD_WRITE, handle, block * PAGE, PAGE, data,
                                    P.NBD_CMD_FLAG_FUA if rng.random() < 0.1 else 0)
            model[block * PAGE:(block + 1) * PAGE] = data
            expect[handle] = None
        elif roll < 0.80:  # aligned reads of 1..3 blocks
            n = rng.randrange(1, 4) * PAGE
            burst += client.request(P.NBD_CMD_READ, handle, block * PAGE, n)
            lengths[handle] = n
            expect[handle] = _digest(bytes(model[block * PAGE:block * PAGE + n]))
        elif roll < 0.88:  # unaligned read or write: the one-by-one path
            offset, n = block * PAGE + rng.randrange(1, PAGE), rng.randrange(1, 2 * PAGE)
            if rng.random() < 0.5:
                burst += client.request(P.NBD_CMD_READ, handle, offset, n)
                lengths[handle] = n
                expect[handle] = _digest(bytes(model[offset:offset + n]))
            else:
                data = rng.randbytes(n)
                burst += client.request(P.NBD_CMD_WRITE, handle, offset, n, data)
                model[offset:offset + n] = data
                expect[handle] = None
        elif roll < 0.94:
            burst += client.request(P.NBD_CMD_FLUSH, handle)
            expect[handle] = None
        else:
            burst += client.request(P.NBD_CMD_WRITE_ZEROES, handle, block * PAGE, 2 * PAGE)
            model[block * PAGE:(block + 2) * PAGE] = bytes(2 * PAGE)
            expect[handle] = None
    sender = client.send(bytes(burst))
    for _ in range(n_requests):
        handle, error, data = client.reply(lengths)
        assert error == 0, f"request {handle} failed with {error}"
        want = expect.pop(handle)
        if want is not None:
            assert _digest(data) == want, f"READ {handle} returned the wrong bytes"
        else:
            assert data == b""
    sender.join()
    assert not expect


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_mixed_requests_match_the_model(server, structured, monkeypatch):
    srv, path = server
    batches = []
    for name in ("read_pages", "write_pages"):
        real = getattr(srv.backend, name)
        monkeypatch.setattr(srv.backend, name, lambda pages, buf, real=real: (batches.append(len(pages)),
                                                                               real(pages, buf))[1])
    rng = random.Random(1234 + structured)
    model = bytearray(SIZE)
    client = Client(path, structured)
    try:
        for _ in range(6):
            _run_pipelined(client, model, rng, 200)
    finally:
        client.close()
    deadline = time.monotonic() + 5  # the server counts a request after its reply is out
    while srv.counters["requests"] < 1200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.counters["requests"] == 1200
    assert batches and max(batches) > 2  # the burst was really served in batches
    assert srv.counters["errors"] == 0


def test_repeated_block_in_one_write_batch_keeps_the_last_write(server):
    _, path = server
    client = Client(path, structured=False)
    try:
        first, last = b"\x11" * PAGE, b"\x22" * PAGE
        burst = (client.request(P.NBD_CMD_WRITE, 1, 5 * PAGE, PAGE, first)
                 + client.request(P.NBD_CMD_WRITE, 2, 6 * PAGE, PAGE, first)
                 + client.request(P.NBD_CMD_WRITE, 3, 5 * PAGE, PAGE, last)
                 + client.request(P.NBD_CMD_READ, 4, 5 * PAGE, 2 * PAGE))
        client.sock.sendall(burst)
        replies = {h: d for h, _, d in (client.reply({4: 2 * PAGE}) for _ in range(4))}
        assert replies[4] == last + first
    finally:
        client.close()


def test_a_batch_larger_than_the_batch_buffer_is_split(server):
    _, path = server
    client = Client(path, structured=True)
    rng = random.Random(7)
    pages = [_page(rng) for _ in range(SIZE // PAGE)]
    try:
        client.sock.sendall(b"".join(client.request(P.NBD_CMD_WRITE, i + 1, i * PAGE, PAGE, p)
                                     for i, p in enumerate(pages)))
        for _ in pages:
            assert client.reply({})[1] == 0
        n = MAX_BATCH_PAGES + 10  # reads of two pages each: more pages than one batch holds
        client.sock.sendall(b"".join(client.request(P.NBD_CMD_READ, i + 1, (2 * i) % (SIZE - PAGE), 2 * PAGE)
                                     for i in range(n)))
        for _ in range(n):
            handle, error, data = client.reply({})
            offset = (2 * (handle - 1)) % (SIZE - PAGE)
            assert error == 0 and data == b"".join(pages)[offset:offset + 2 * PAGE]
    finally:
        client.close()


class _FailingBatches(MemoryBackend):
    """Batch calls fail; the server must retry the requests one by one."""

    def read_pages(self, pages: np.ndarray, out) -> None:
        raise OSError(5, "batch read failed")

    def write_pages(self, pages: np.ndarray, data) -> None:
        raise RuntimeError("batch write failed")


def test_a_failed_batch_is_retried_request_by_request(tmp_path):
    backend = _FailingBatches(SIZE)
    data = os.urandom(4 * PAGE)
    with NBDServer(backend) as srv:
        path = srv.listen_unix(str(tmp_path / "nbd.sock"))
        srv.start()
        client = Client(path, structured=False)
        try:
            client.sock.sendall(b"".join(client.request(P.NBD_CMD_WRITE, i + 1, i * PAGE, PAGE,
                                                        data[i * PAGE:(i + 1) * PAGE]) for i in range(4)))
            assert sorted(client.reply({})[:2] for _ in range(4)) == [(i + 1, 0) for i in range(4)]
            client.sock.sendall(b"".join(client.request(P.NBD_CMD_READ, i + 1, i * PAGE, PAGE) for i in range(4)))
            got = {h: d for h, e, d in (client.reply({i + 1: PAGE for i in range(4)}) for _ in range(4))}
            assert b"".join(got[i + 1] for i in range(4)) == data
        finally:
            client.close()
        assert srv.counters["errors"] == 0


def test_a_negative_spin_is_refused():
    with pytest.raises(errors.ConfigError, match="spin"):
        NBDServer(MemoryBackend(SIZE), spin_us=-1)
