"""The NBD server's C path for single 4 KiB READs and WRITEs (rram._ext._nbdserve).

A queue-depth-1 client (as the kernel's swap mostly is) talks to two servers over two page
stores, one serving single blocks in C and one all in Python; every reply must be the same,
byte for byte, and match a reference model.  Also: several connections at once, remote pages
read in C over tcp, and a provider killed in the middle of a run (the C path declines the
requests it cannot finish, the failover path serves them).
"""
from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram.frontends.nbd import protocol as P
from rram.frontends.nbd.backend import PageStoreBackend
from rram.frontends.nbd.server import NBDServer
from rram.testing.inproc import InProcessProvider, export_backend, make_store

from .test_nbd_batching import Client

pytest.importorskip("rram._ext._nbdserve", reason="built without liblz4: no C request path")

PAGE = 4096
SIZE = 128 * PAGE


@contextlib.contextmanager
def serve(backend, tmp_path, name: str, c_requests: bool):
    with NBDServer(backend, c_requests=c_requests) as srv:
        path = str(tmp_path / f"{name}.sock")
        srv.listen_unix(path)
        srv.start()
        yield srv, path


def _settled(srv: NBDServer) -> dict:
    """The server's counters once every connection has ended (a reply goes out before it is counted)."""
    deadline = time.monotonic() + 10
    while srv.active_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    return srv.counters


def _request(client: Client, op: tuple, handle: int) -> tuple[int, bytes]:
    """Send one request and wait for its reply: (error, data)."""
    kind, block, seed, extra = op
    rng = random.Random(seed)
    offset = block * PAGE
    if kind == "write":
        data = rng.randbytes(PAGE // 2) + bytes([seed & 0xFF]) * (PAGE // 2)
        flags = P.NBD_CMD_FLAG_FUA if extra % 5 == 0 else 0
        client.sock.sendall(client.request(P.NBD_CMD_WRITE, handle, offset, PAGE, data, flags))
        lengths = {}
    elif kind == "zero_write":
        client.sock.sendall(client.request(P.NBD_CMD_WRITE, handle, offset, PAGE, bytes(PAGE)))
        lengths = {}
    elif kind == "read":
        client.sock.sendall(client.request(P.NBD_CMD_READ, handle, offset, PAGE))
        lengths = {handle: PAGE}
    elif kind == "read3":  # three blocks in one request
        client.sock.sendall(client.request(P.NBD_CMD_READ, handle, offset, 3 * PAGE))
        lengths = {handle: 3 * PAGE}
    elif kind == "write2":  # two blocks in one request
        data = rng.randbytes(PAGE) + bytes([seed & 0xFF]) * PAGE
        client.sock.sendall(client.request(P.NBD_CMD_WRITE, handle, offset, 2 * PAGE, data))
        lengths = {}
    elif kind == "unaligned_write":
        data = rng.randbytes(extra % PAGE + 1)
        client.sock.sendall(client.request(P.NBD_CMD_WRITE, handle, offset + 7, len(data), data))
        lengths = {}
    else:  # trim two blocks
        client.sock.sendall(client.request(P.NBD_CMD_TRIM, handle, offset, 2 * PAGE))
        lengths = {}
    got, error, data = client.reply(lengths)
    assert got == handle
    return error, data


_ops = st.lists(st.tuples(st.sampled_from(["write", "write", "read", "read", "read3", "write2", "zero_write",
                                           "unaligned_write", "trim"]),
                          st.integers(0, SIZE // PAGE - 3), st.integers(0, 1 << 30), st.integers(0, 1 << 20)),
                min_size=1, max_size=150)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ops=_ops, structured=st.booleans())
def test_c_path_answers_like_the_python_path(tmp_path, ops, structured):
    with export_backend("pagestore", SIZE) as b_c, export_backend("pagestore", SIZE) as b_py, \
            serve(b_c, tmp_path, "c", True) as (srv_c, path_c), serve(b_py, tmp_path, "py", False) as (srv_py, path_py):
        c, py = Client(path_c, structured), Client(path_py, structured)
        try:
            for handle, op in enumerate(ops, 1):
                assert _request(c, op, handle) == _request(py, op, handle), op
            for block in range(SIZE // PAGE):  # the whole export, read back both ways
                op = ("read", block, 0, 0)
                assert _request(c, op, 10_000 + block) == _request(py, op, 10_000 + block)
        finally:
            c.close()
            py.close()
        assert _settled(srv_py)["c_requests"] == 0
        assert _settled(srv_c)["c_requests"] > 0
        assert srv_c.counters["errors"] == srv_py.counters["errors"] == 0


def test_single_requests_take_the_c_path_and_remote_pages_decline(tmp_path):
    with export_backend("pagestore", SIZE) as backend, serve(backend, tmp_path, "c", True) as (srv, path):
        client = Client(path, structured=False)
        model = {}
        try:
            for block in range(SIZE // PAGE):  # 128 half-compressible pages > the 128 KiB local budget
                op = ("write", block, block, 1)
                assert _request(client, op, block + 1) == (0, b"")
                model[block] = op
            for block in range(SIZE // PAGE):
                error, data = _request(client, ("read", block, 0, 0), 1000 + block)
                seed = model[block][2]
                rng = random.Random(seed)
                assert error == 0 and data == rng.randbytes(PAGE // 2) + bytes([seed & 0xFF]) * (PAGE // 2)
        finally:
            client.close()
        stats = backend.store.stats()
        assert _settled(srv)["c_requests"] > 0 and srv.counters["c_declined"] > 0
        assert stats["c_reads"] > 0 and stats["c_writes"] > 0 and stats["remote_pages"] > 0


def _client_loop(path: str, first: int, n: int, rounds: int, errors: list, kill=None) -> None:
    try:
        client = Client(path, structured=True)
        model: dict[int, tuple] = {}
        try:
            for r in range(rounds):
                for block in range(first, first + n):
                    op = ("write", block, block * 1000 + r, 1)
                    assert _request(client, op, 1) == (0, b"")
                    model[block] = op
                if kill is not None and r == rounds // 2:
                    kill()
                for block in range(first, first + n):
                    seed = model[block][2]
                    rng = random.Random(seed)
                    want = rng.randbytes(PAGE // 2) + bytes([seed & 0xFF]) * (PAGE // 2)
                    assert _request(client, ("read", block, 0, 0), 2) == (0, want), (block, r)
        finally:
            client.close()
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(exc)


def test_concurrent_connections(tmp_path):
    with export_backend("pagestore", SIZE) as backend, serve(backend, tmp_path, "c", True) as (srv, path):
        errors: list = []
        threads = [threading.Thread(target=_client_loop, args=(path, k * 32, 32, 4, errors)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
        assert _settled(srv)["c_requests"] > 0 and srv.counters["errors"] == 0


@pytest.mark.parametrize("transport", ["loopback", "tcp"])
def test_provider_killed_mid_run(tmp_path, transport):
    """Over tcp the C path reads remote pages itself: the kill makes one of its READs fail, the
    request goes to Python (nothing sent to the client yet), and p0 is suspended."""
    providers = [InProcessProvider(f"p{i}", 16 << 20, transport) for i in range(2)]
    store = make_store(providers, replicas=2, local_budget=128 << 10, slab_size=1 << 20,
                       seal=False)  # sealed pages: tests/unit/test_reqpath.py and test_nbd_creads.py
    try:
        backend = PageStoreBackend(store, store.create_pool(persistent=True), obj=1, size=SIZE)
        with serve(backend, tmp_path, "c", True) as (srv, path):
            errors: list = []
            threads = [threading.Thread(target=_client_loop,
                                        args=(path, k * 64, 64, 4, errors, providers[0].kill if k == 0 else None))
                       for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors[0]
            assert _settled(srv)["c_requests"] > 0 and srv.counters["errors"] == 0
        stats = store.stats()
        assert stats["providers"]["p0"] == "suspended"  # dead is the keeper's call (none here)
        if transport == "tcp":
            assert stats["c_remote_reads"] > 0
    finally:
        store.close()
        for p in providers:
            p.close()


def test_remote_single_reads_are_served_in_c_over_tcp(tmp_path):
    providers = [InProcessProvider(f"p{i}", 16 << 20, "tcp") for i in range(2)]
    store = make_store(providers, replicas=2, local_budget=128 << 10, slab_size=1 << 20,
                       seal=False)  # sealed pages: tests/unit/test_reqpath.py and test_nbd_creads.py
    try:
        backend = PageStoreBackend(store, store.create_pool(persistent=True), obj=1, size=SIZE)
        with serve(backend, tmp_path, "c", True) as (srv, path):
            errors: list = []
            _client_loop(path, 0, SIZE // PAGE - 3, 2, errors)
            assert not errors, errors[0]
            counters = _settled(srv)
        stats = store.stats()
        assert stats["remote_pages"] > 0 and stats["c_remote_reads"] >= stats["remote_pages"]
        declined = stats["c_declined_by"]
        assert sum(v for k, v in declined.items() if k.startswith("read_")) == 0, declined
        assert counters["errors"] == 0
    finally:
        store.close()
        for p in providers:
            p.close()
