"""Sealed pages against real provider processes that turn hostile: their slab memory is read and
rewritten for real (through /proc/PID/mem at the slab's address), as a provider's operator could.

A page altered on one replica is served from the other and counted; altered on every replica, or
swapped with another page, or replaced by an older image of itself, the read fails loudly.  With
``seal: false`` the provider sees the pages and a swap goes unnoticed (what sealing buys).
"""
from __future__ import annotations

import numpy as np
import pytest

from rram import PAGE_SIZE, errors
from rram.cluster import open_store
from rram.datapath import keys as K
from rram.datapath import slab as L
from rram.metrics import StatsCollector

pytestmark = pytest.mark.integration

N = 600  # pages: with a 64 KiB local budget, nearly all of them go remote


def _copies(cluster, store, pool, obj, index):
    """[(provider pid, address, stored length)] of every replica of one remote page, in the order
    reads try them (the first is the one a read goes to)."""
    loc = store.map.get(K.pack(pool, obj, index))
    assert L.is_remote(loc), "the page should be on the providers"
    tier = store.remote
    slab = L.loc_slab(loc)
    out = []
    for k in range(tier.replicas):
        j = (slab + k) % tier.replicas  # as FastPath._read_one and Failover.read
        li = int(tier.rep_link[j, slab])
        name = tier.links[li].name
        out.append((cluster.procs[name].pid, int(tier.rep_addr[j, slab]) + L.loc_offset(loc), L.loc_size(loc)))
    return out


def _peek(pid, addr, n) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(addr)
        return mem.read(n)


def _poke(pid, addr, data: bytes) -> None:
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(addr)
        mem.write(data)


def _flip(pid, addr, at: int) -> None:
    b = _peek(pid, addr + at, 1)
    _poke(pid, addr + at, bytes([b[0] ^ 0x40]))


def _store(cluster, seal=True):
    return open_store(cluster.config, name="victim", local_budget=64 << 10, keeper=False, seal=seal)


def _random_pages(n, seed):
    """Incompressible pages: every image is stored raw, so all have the same length."""
    return np.random.default_rng(seed).integers(0, 256, n * PAGE_SIZE, dtype=np.uint8)


def _text_pages(n):
    """Compressible pages with a marker string a provider could search its memory for."""
    line = b"user=alice password=hunter2-very-secret token=0123456789abcdef\n"
    page = (line * (PAGE_SIZE // len(line) + 1))[:PAGE_SIZE]
    return np.frombuffer(page * n, dtype=np.uint8).copy()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "failover"])
def test_a_page_altered_on_one_replica_is_served_from_the_other(cluster, fast):
    data = _random_pages(N, 1)
    with _store(cluster) as store:
        store.fast_path = fast
        pool = store.create_pool()
        store.put_many(pool, 0, np.arange(N), data)
        victim = 123
        pid, addr, size = _copies(cluster, store, pool, 0, victim)[0]
        _flip(pid, addr, 100)  # one bit of the ciphertext
        want = data[victim * PAGE_SIZE : (victim + 1) * PAGE_SIZE].tobytes()
        assert store.get(pool, 0, victim) == want  # the latency path
        assert store.stats()["seal_failures"] == 1
        out = np.zeros_like(data)  # and in a batch, with every other page
        assert store.get_many(pool, 0, np.arange(N), out).all()
        assert np.array_equal(out, data)
        s = store.stats()
        assert s["seal_recovered"] >= 2 and s["failed_gets"] == 0
        metrics = {m.name: m.samples[0].value for m in StatsCollector("rram_requester", store.stats).collect()}
        assert metrics["rram_requester_seal_failures"] == s["seal_failures"]
        # the tag itself altered, on another page: the same
        failures = s["seal_failures"]
        pid, addr, size = _copies(cluster, store, pool, 0, 7)[0]
        _flip(pid, addr, size - 1)
        assert store.get(pool, 0, 7) == data[7 * PAGE_SIZE : 8 * PAGE_SIZE].tobytes()
        assert store.stats()["seal_failures"] == failures + 1


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "failover"])
def test_a_page_altered_on_every_replica_fails_loudly_and_the_store_goes_on(cluster, fast):
    data = _random_pages(N, 2)
    with _store(cluster) as store:
        store.fast_path = fast
        pool = store.create_pool()
        store.put_many(pool, 0, np.arange(N), data)
        for pid, addr, _size in _copies(cluster, store, pool, 0, 50):
            _flip(pid, addr, 4000)
        with pytest.raises(errors.SealError, match="failed their seal on every copy") as exc:
            store.get(pool, 0, 50)
        assert exc.value.errno == 5  # EIO, what the NBD server answers
        out = np.full(4 * PAGE_SIZE, 0xAA, dtype=np.uint8)
        with pytest.raises(errors.SealError):
            store.get_many(pool, 0, [48, 49, 50, 51], out)
        # never wrong bytes and never zeros in their place; every other page still reads
        assert store.get(pool, 0, 51) == data[51 * PAGE_SIZE : 52 * PAGE_SIZE].tobytes()
        assert store.stats()["seal_failures"] >= 4
        store.put(pool, 0, 50, data[:PAGE_SIZE])  # and the page can be written again
        assert store.get(pool, 0, 50) == data[:PAGE_SIZE].tobytes()


def test_a_swapped_page_and_a_replayed_old_version_are_refused(cluster):
    data = _random_pages(N, 3)
    with _store(cluster) as store:
        pool = store.create_pool()
        store.put_many(pool, 0, np.arange(N), data)
        # swap: the provider answers a read of page 10 with page 11's sealed image (same length)
        a, b = _copies(cluster, store, pool, 0, 10), _copies(cluster, store, pool, 0, 11)
        assert a[0][2] == b[0][2]
        for (pid, addr_a, size), (_pid, addr_b, _s) in zip(a, b):
            _poke(pid, addr_a, _peek(pid, addr_b, size))
        with pytest.raises(errors.SealError):
            store.get(pool, 0, 10)
        assert store.get(pool, 0, 11) == data[11 * PAGE_SIZE : 12 * PAGE_SIZE].tobytes()
        # replay: page 20 is written again; the provider puts its old image where the new one is
        old = [_peek(pid, addr, size) for pid, addr, size in _copies(cluster, store, pool, 0, 20)]
        new_page = _random_pages(1, 4)
        store.put(pool, 0, 20, new_page)
        store.put_many(pool, 0, np.arange(100, 100 + N), _random_pages(N, 5))  # push it out again
        new = _copies(cluster, store, pool, 0, 20)
        assert new[0][2] == len(old[0])
        for (pid, addr, _size), image in zip(new, old):
            _poke(pid, addr, image)
        with pytest.raises(errors.SealError):
            store.get(pool, 0, 20)


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "plain"])
def test_what_a_provider_sees_of_a_page(cluster, seal):
    """Sealed, the provider holds no recognisable byte of a page and a swap fails; unsealed, the
    LZ4 literals show the secret and a swapped page is returned as if it were right."""
    data = _text_pages(N)
    with _store(cluster, seal) as store:
        pool = store.create_pool()
        store.put_many(pool, 0, np.arange(N), data)
        (pid, addr, size), _ = _copies(cluster, store, pool, 0, 5)
        image = _peek(pid, addr, size)
        assert (b"hunter2" in image) == (not seal)
        rnd = _random_pages(2, 6)  # two incompressible pages of the same length, then swapped
        store.put_many(pool, 0, [900, 901], rnd)
        store.put_many(pool, 0, np.arange(1000, 1000 + N), data)
        a, b = _copies(cluster, store, pool, 0, 900), _copies(cluster, store, pool, 0, 901)
        for (pid, addr_a, size), (_pid, addr_b, _s) in zip(a, b):
            _poke(pid, addr_a, _peek(pid, addr_b, size))
        if seal:
            with pytest.raises(errors.SealError):
                store.get(pool, 0, 900)
        else:
            assert store.get(pool, 0, 900) == rnd[PAGE_SIZE:].tobytes()  # wrong bytes, unnoticed


def test_a_page_altered_under_the_c_request_path_is_recovered_and_counted_once(cluster, tmp_path):
    """The NBD server's C path reads the altered copy first and declines, and so does store.get's;
    Python reads that copy again, fails it, and serves the other: one bad copy, one failure counted."""
    pytest.importorskip("rram._ext._nbdserve", reason="built without liblz4: no C request path")
    from rram.frontends.nbd import protocol as P
    from rram.frontends.nbd.backend import PageStoreBackend
    from rram.frontends.nbd.server import NBDServer

    from ..unit.test_nbd_batching import Client

    data = _random_pages(N, 8)
    with _store(cluster) as store:
        pool = store.create_pool(persistent=True)
        store.put_many(pool, 1, np.arange(N), data)
        with NBDServer(PageStoreBackend(store, pool, obj=1, size=N * PAGE_SIZE), c_requests=True) as srv:
            path = str(tmp_path / "nbd.sock")
            srv.listen_unix(path)
            srv.start()
            client = Client(path, structured=False)
            try:
                def read(block):
                    client.sock.sendall(client.request(P.NBD_CMD_READ, 3, block * PAGE_SIZE, PAGE_SIZE))
                    _h, error, got = client.reply({3: PAGE_SIZE})
                    assert error == 0 and got == data[block * PAGE_SIZE:(block + 1) * PAGE_SIZE].tobytes(), block
                read(300)  # a remote page, in C
                assert store.stats()["c_remote_reads"] == 1
                pid, addr, _size = _copies(cluster, store, pool, 1, 301)[0]
                _flip(pid, addr, 10)
                read(301)
                s = store.stats()
                # C saw the bad tag and declined twice: the NBD loop's read, then store.get's
                # (Python's fallback tries C first); neither counts a seal failure, Python's read does
                assert s["c_declined_by"]["read_remote_error"] == 2
                assert (s["seal_failures"], s["seal_recovered"]) == (1, 1)
                assert store.seal.sealer.failures == 1  # the sealer's own count agrees
            finally:
                client.close()
