"""The store's C request path (ext/_reqpath.pyx): single requests read and written without the GIL.

Every test drives a real PageStore (local pool + in-process providers over the loopback
transport, or over tcp where C reads remote pages too), with a local budget small enough that
pages go remote, so the C path both serves requests and declines them (remote page without a C
core, full local pool, remote copy to replace, a link that failed); a declined request is then
served by the Python path, as the NBD server does.  The contents are checked
against a reference model, and the C path against the Python path byte for byte.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram import PAGE_SIZE
from rram.testing.inproc import InProcessProvider, make_store

_reqpath = pytest.importorskip("rram._ext._reqpath", reason="built without liblz4: no C request path")
DONE, REMOTE, LOCAL_FULL, OLD_REMOTE = (_reqpath.REQ[k] for k in ("done", "remote", "local_full", "old_remote"))
LINK_FAILED = _reqpath.REQ["link_failed"]
OBJ = 3


def page_of(seed: int, kind: str = "half") -> bytes:
    """A page: ``zero``, ``raw`` (incompressible) or ``half`` (about 2:1, like swapped heap)."""
    if kind == "zero":
        return bytes(PAGE_SIZE)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    if kind == "half":
        data[PAGE_SIZE // 2:] = seed & 0xFF
    return data.tobytes()


class Store:
    """A store, its pool and the two ways to serve one page (C first, as the NBD server does)."""

    def __init__(self, local_budget: int = 256 << 10, providers: int = 1, replicas: int = 1,
                 transport: str = "loopback", seal: bool = False):
        self.providers = [InProcessProvider(f"p{i}", 32 << 20, transport) for i in range(providers)]
        self.store = make_store(self.providers, local_budget=local_budget, slab_size=1 << 20, replicas=replicas,
                                seal=seal)
        self.pool = self.store.create_pool(persistent=True)
        self.base = (self.pool << 56) | (OBJ << 32)
        self.path = self.store.requests

    def write(self, index: int, page: bytes) -> int:
        rc = self.path.write(self.base | index, page)
        if rc != DONE:
            self.store.put(self.pool, OBJ, index, page)
        return rc

    def read(self, index: int) -> tuple[bytes, int]:
        out = bytearray(PAGE_SIZE)
        rc = self.path.read(self.base | index, out)
        if rc != DONE:
            out = bytearray(PAGE_SIZE)
            if self.store.get(self.pool, OBJ, index, out) is None:
                out[:] = bytes(PAGE_SIZE)
        return bytes(out), rc

    def python_read(self, index: int) -> bytes:
        """The page through the store's Python path (get_many; store.get tries C first)."""
        out = bytearray(PAGE_SIZE)
        self.store.get_many(self.pool, OBJ, [index], out)
        return bytes(out)

    def close(self) -> None:
        self.store.close()
        for p in self.providers:
            p.close()


@pytest.fixture
def s():
    st_ = Store()
    yield st_
    st_.close()


def test_local_pages_are_served_in_c(s):
    pages = {i: page_of(i, kind) for i, kind in enumerate(["half", "raw", "zero", "half"])}
    for i, page in pages.items():
        assert s.write(i, page) == DONE
    for i, page in pages.items():
        got, rc = s.read(i)
        assert rc == DONE and got == page
        assert s.python_read(i) == page  # the Python path sees what C wrote
    assert s.read(99) == (bytes(PAGE_SIZE), DONE)  # never written: zeros
    stats = s.store.stats()
    assert stats["c_writes"] == 4 and stats["c_reads"] == 5
    assert stats["pages"] == 4 and stats["zero_pages"] == 1 and stats["local_pages"] == 3
    assert stats["puts"] == 4 and stats["failed_gets"] == 1


def test_declines_remote_full_and_closed(s):
    n = 200  # ~2 KiB each: far more than the 256 KiB local budget
    for i in range(n):
        s.write(i, page_of(i))
    c = s.path.counters()
    assert c["write_done"] > 0 and c["write_local_full"] > 0  # remotify ran in Python in between
    assert s.store.stats()["remote_pages"] > 0
    outcomes = {s.read(i)[1] for i in range(n)}
    assert {DONE, REMOTE} <= outcomes
    for i in range(n):
        assert s.read(i)[0] == page_of(i)
    remote = next(i for i in range(n) if s.path.read(s.base | i, bytearray(PAGE_SIZE)) == REMOTE)
    before = s.store.stats()["remote_pages"]
    assert s.path.write(s.base | remote, page_of(7)) == DONE  # the remote copy is retired...
    assert s.path.nretired == 1
    assert s.read(remote)[0] == page_of(7)
    assert s.store.stats()["remote_pages"] == before - 1  # ...and freed when Python next holds the lock
    assert s.path.nretired == 0
    s.path.enabled = False
    assert s.path.read(s.base | 0, bytearray(PAGE_SIZE)) == _reqpath.REQ["unavailable"]
    s.path.enabled = True
    s.store.invalidate_pool(s.pool)  # the pool is gone: C must not resurrect it
    assert s.path.write(s.base | 0, page_of(1)) == _reqpath.REQ["unavailable"]
    s.store.close()
    assert s.path.read(s.base | 0, bytearray(PAGE_SIZE)) == _reqpath.REQ["unavailable"]


def test_retired_remote_copies_are_bounded():
    """Zero pages written in C over remote pages need no local slot, so only the retired list
    bounds them: once full, C declines until Python frees the list."""
    s = Store(local_budget=128 << 10)
    try:
        n = _reqpath.RETIRED_CAPACITY + 200
        idx = np.arange(n, dtype=np.uint32)
        s.store.put_many(s.pool, OBJ, idx, b"".join(page_of(i) for i in range(n)))
        remote = [i for i in range(n) if s.path.read(s.base | i, bytearray(PAGE_SIZE)) == REMOTE]
        assert len(remote) > _reqpath.RETIRED_CAPACITY
        codes = [s.path.write(s.base | i, bytes(PAGE_SIZE)) for i in remote]
        assert codes.count(DONE) == _reqpath.RETIRED_CAPACITY and set(codes[_reqpath.RETIRED_CAPACITY:]) == {OLD_REMOTE}
        used = s.store.stats()["remote_pages"]  # frees the retired copies
        assert used == len(remote) - _reqpath.RETIRED_CAPACITY
        for i in remote[_reqpath.RETIRED_CAPACITY:]:
            assert s.write(i, bytes(PAGE_SIZE)) == DONE
        assert s.store.stats()["remote_pages"] == 0
        for i in range(n):
            assert s.read(i)[0] == (bytes(PAGE_SIZE) if i in set(remote) else page_of(i))
    finally:
        s.close()


def test_bad_buffers_are_refused(s):
    with pytest.raises(ValueError, match="4096"):
        s.path.read(s.base, bytearray(100))
    with pytest.raises(ValueError, match="4096"):
        s.path.write(s.base, bytes(4097))
    assert s.read(0) == (bytes(PAGE_SIZE), DONE)  # still serving


_ops = st.lists(st.tuples(st.sampled_from(["c_write", "py_write", "read", "invalidate", "repatriate"]),
                          st.integers(0, 95), st.integers(0, 1 << 30),
                          st.sampled_from(["half", "raw", "zero"])), min_size=1, max_size=120)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_agrees_with_python_path(ops):
    """Random mixes of C and Python writes, reads, invalidations and repatriation agree with a model,
    and every page read in C equals the page the Python path reads."""
    s = Store(local_budget=128 << 10)
    model: dict[int, bytes] = {}
    try:
        for op, index, seed, kind in ops:
            if op == "c_write":
                model[index] = page_of(seed, kind)
                s.write(index, model[index])
            elif op == "py_write":
                model[index] = page_of(seed, kind)
                s.store.put(s.pool, OBJ, index, model[index])
            elif op == "read":
                got, rc = s.read(index)
                assert got == model.get(index, bytes(PAGE_SIZE))
                assert s.python_read(index) == got
            elif op == "invalidate":
                s.store.invalidate_page(s.pool, OBJ, index)
                model.pop(index, None)
            else:
                s.store.repatriate(16)
        for index in range(96):
            assert s.read(index)[0] == model.get(index, bytes(PAGE_SIZE)), index
        st_ = s.store.stats()
        assert st_["pages"] == len(model)
    finally:
        s.close()


@pytest.mark.parametrize("transport", ["loopback", "tcp"])
def test_concurrent_c_and_python_writers_keep_every_page(transport):
    """C requests (several threads, no GIL) race Python batches, remotify and repatriation on one
    store: the lock must keep the tables whole, and every acknowledged write must read back.
    Over tcp, C's remote READs share the links with Python's batches."""
    s = Store(local_budget=192 << 10, providers=2, replicas=2, transport=transport)
    rounds, span = 6, 64
    errors: list[BaseException] = []
    final: dict[int, bytes] = {}
    lock = threading.Lock()

    def c_worker(t: int) -> None:
        try:
            for r in range(rounds):
                for i in range(span):
                    index = t * span + i
                    page = page_of(index * 131 + r)
                    s.write(index, page)
                    got, _ = s.read(index)
                    assert got == page, (t, r, i)
            with lock:
                for i in range(span):
                    final[t * span + i] = page_of((t * span + i) * 131 + rounds - 1)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def py_worker(t: int) -> None:
        try:
            idx = np.arange(t * span, (t + 1) * span, dtype=np.uint32)
            for r in range(rounds):
                pages = b"".join(page_of(int(i) * 17 + r) for i in idx)
                s.store.put_many(s.pool, OBJ, idx, pages)
                out = bytearray(len(pages))
                s.store.get_many(s.pool, OBJ, idx, out)
                assert bytes(out) == pages
                s.store.repatriate(32)
            with lock:
                for i in idx.tolist():
                    final[i] = page_of(i * 17 + rounds - 1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=c_worker, args=(t,)) for t in range(3)]
    threads += [threading.Thread(target=py_worker, args=(t,)) for t in range(3, 5)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors[0]
        digest = {i: hashlib.sha256(p).hexdigest() for i, p in final.items()}
        for i in sorted(final):
            assert hashlib.sha256(s.read(i)[0]).hexdigest() == digest[i], i
        c = s.path.counters()
        assert c["write_done"] > 0 and c["read_done"] > 0
        assert s.store.stats()["pages"] == len(final)
    finally:
        s.close()


def test_store_lock_is_reentrant_and_checks_the_owner(s):
    lock = s.store._lock
    with lock:
        with lock:  # the store re-enters (put -> put_many)
            assert s.write(0, page_of(0)) == DONE  # the C path in the same thread re-enters too
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


# -- remote pages read in C (tcp links) ---------------------------------------------------------


def _remote_indexes(s: Store, n: int) -> list[int]:
    return [i for i in range(n) if (s.store.map.get(s.base | i) >> 37) >= 4096]


@pytest.fixture(params=[False, True], ids=["plain", "sealed"])
def tcp(request):
    st_ = Store(providers=2, replicas=2, transport="tcp", seal=request.param)
    yield st_
    st_.close()


def test_remote_pages_are_read_in_c_over_tcp(tcp):
    n = 200
    pages = {i: page_of(i, "raw" if i % 7 == 0 else "zero" if i % 11 == 0 else "half") for i in range(n)}
    tcp.store.put_many(tcp.pool, OBJ, np.arange(n, dtype=np.uint32), b"".join(pages[i] for i in range(n)))
    remote = _remote_indexes(tcp, n)
    assert len(remote) > n // 2
    before = tcp.store.stats()
    for i in range(n):
        got, rc = tcp.read(i)
        assert rc == DONE and hashlib.sha256(got).digest() == hashlib.sha256(pages[i]).digest(), i
    stats = tcp.store.stats()
    assert stats["c_remote_reads"] == len(remote) and stats["c_declined"] == 0
    assert stats["remote_gets"] - before["remote_gets"] == len(remote)
    # a run (as one NBD request): local, remote, zero and never-written pages, over two chunks
    idx = np.array(list(range(n - 30, n)) + [n + 5], dtype=np.uint32)
    out = bytearray(len(idx) * PAGE_SIZE)
    assert tcp.path.read_many(tcp.base, idx, out) == DONE
    want = b"".join(pages.get(int(i), bytes(PAGE_SIZE)) for i in idx)
    assert bytes(out) == want
    assert tcp.store.stats()["c_remote_batches"] < stats["c_remote_batches"] + 2 * 2 + 1  # <= 1 per link and chunk


def test_store_get_reads_in_c_and_answers_misses_in_python(tcp):
    """store.get (the latency path) goes through C; a miss stays store.get's None with ``out``
    untouched; gets with out=None from several threads at once each get their own page."""
    n = 120
    pages = {i: page_of(i, "raw" if i % 7 == 0 else "half") for i in range(n)}
    tcp.store.put_many(tcp.pool, OBJ, np.arange(n, dtype=np.uint32), b"".join(pages[i] for i in range(n)))
    remote = _remote_indexes(tcp, n)
    before = tcp.store.stats()
    for i in remote:
        out = bytearray(PAGE_SIZE)
        assert tcp.store.get(tcp.pool, OBJ, i, out) is out and bytes(out) == pages[i], i
    stats = tcp.store.stats()
    assert stats["c_remote_reads"] - before["c_remote_reads"] == len(remote)
    assert stats["remote_gets"] - before["remote_gets"] == len(remote) and stats["c_declined"] == 0
    out = bytearray(b"\xaa" * PAGE_SIZE)
    assert tcp.store.get(tcp.pool, OBJ, n + 9, out) is None and out == b"\xaa" * PAGE_SIZE
    assert tcp.store.stats()["failed_gets"] == stats["failed_gets"] + 1
    bad = []

    def reader(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(n)
        for i in order[:60]:
            if tcp.store.get(tcp.pool, OBJ, int(i)) != pages[int(i)]:
                bad.append(int(i))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_route_changes_unbind_the_c_path_until_python_binds_it_again():
    s = Store(providers=3, replicas=2, transport="tcp")
    try:
        n = 300
        pages = {i: page_of(i) for i in range(n)}
        s.store.put_many(s.pool, OBJ, np.arange(n, dtype=np.uint32), b"".join(pages[i] for i in range(n)))
        remote = _remote_indexes(s, n)
        out = bytearray(PAGE_SIZE)
        assert s.path.read(s.base | remote[0], out) == DONE
        victim = max(s.store.remote.links, key=lambda lk: s.store.remote.slabs_on(lk.index))
        s.store.drain(victim.name)  # a route change: C must not use its old binding
        assert not s.path.remote_is_bound
        assert s.path.read(s.base | remote[0], out) == REMOTE
        assert s.read(remote[0])[0] == pages[remote[0]]  # Python serves it, and binds C again
        assert s.path.remote_is_bound
        k = 0
        while s.store.repair(0.05):  # the drain copies slabs while C reads and writes go on
            i = remote[k % len(remote)]
            k += 1
            got, _ = s.read(i)
            assert got == pages[i], i
            pages[i] = page_of(i + 1000)
            s.write(i, pages[i])
        assert s.store.remote.slabs_on(victim.index) == 0
        codes = [s.read(i) for i in range(n)]
        assert all(got == pages[i] for i, (got, _rc) in enumerate(codes))
        assert s.store.stats()["c_remote_reads"] > 0
    finally:
        s.close()


def test_a_killed_provider_makes_c_decline_and_python_suspend_it():
    s = Store(providers=2, replicas=2, transport="tcp")
    try:
        n = 200
        pages = {i: page_of(i) for i in range(n)}
        s.store.put_many(s.pool, OBJ, np.arange(n, dtype=np.uint32), b"".join(pages[i] for i in range(n)))
        remote = _remote_indexes(s, n)
        s.providers[0].kill()  # its connections close: the next C READ on it fails
        codes = []
        for i in remote:
            got, rc = s.read(i)
            assert got == pages[i], i
            codes.append(rc)
        assert LINK_FAILED in codes
        stats = s.store.stats()
        assert stats["providers"]["p0"] == "suspended"
        assert stats["c_declined_by"]["read_link_failed"] >= 1
        assert codes.count(DONE) > len(remote) // 2  # the rest read in C from p1
        assert s.path.nfailed == 0
    finally:
        s.close()
