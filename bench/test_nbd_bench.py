"""NBD 4 KiB write+read round trips: the page store backend against a memory baseline.

    .venv/bin/pytest bench/test_nbd_bench.py --benchmark-only -p no:cacheprovider

Both servers run in this process on a unix socket; the client is a raw socket speaking the
protocol (one WRITE and one READ of a random page per round).  The baseline (MemoryBackend)
is the cost of the protocol and the server loop; the page store adds compression, the page
map and, beyond the local budget, remote slabs on in-process providers.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile

import numpy as np
import pytest

from rram.frontends.nbd import protocol as P
from rram.frontends.nbd.backend import MemoryBackend, PageStoreBackend
from rram.frontends.nbd.server import NBDServer
from rram.testing.inproc import InProcessProvider, make_store

SIZE = 16 << 20
PAGE = 4096
_medians: dict[str, float] = {}


def _recv(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        assert k
        got += k
    return buf


def _connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    _recv(s, P.GREETING.size)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, 6) + b"\0" * 6)
    while True:
        _, _, kind, length = struct.unpack(">QIII", _recv(s, 20))
        _recv(s, length)
        if kind == P.NBD_REP_ACK:
            return s


@pytest.fixture(params=["memory", "pagestore"])
def served(request):
    tmp = tempfile.mkdtemp(prefix="rram-nbdb-")
    providers = []
    if request.param == "memory":
        backend, store = MemoryBackend(SIZE), None
    else:
        providers = [InProcessProvider("p0", 64 << 20)]
        store = make_store(providers, local_budget=4 << 20, slab_size=4 << 20)
        backend = PageStoreBackend(store, store.create_pool(), size=SIZE)
    server = NBDServer(backend)
    path = server.listen_unix(os.path.join(tmp, "s"))
    server.start()
    sock = _connect(path)
    yield request.param, sock
    sock.close()
    server.close()
    if store is not None:
        store.close()
    for p in providers:
        p.close()
    shutil.rmtree(tmp, ignore_errors=True)


def test_write_read_4k(benchmark, served):
    kind, sock = served
    rng = np.random.default_rng(0)
    page = (b"swap page " * 410)[:PAGE]
    offsets = (rng.integers(0, SIZE // PAGE, 4096) * PAGE).tolist()
    it = iter(offsets * 1000)

    def round_trip():
        off = next(it)
        sock.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, 1, off, PAGE) + page
                     + P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, 2, off, PAGE))
        reply = _recv(sock, 16 + 16 + PAGE)
        assert reply[32:] == page

    benchmark(round_trip)
    _medians[kind] = benchmark.stats.stats.median
    benchmark.extra_info["median_us"] = round(_medians[kind] * 1e6, 1)
    if "memory" in _medians and "pagestore" in _medians:
        benchmark.extra_info["pagestore_over_memory"] = round(_medians["pagestore"] / _medians["memory"], 2)
