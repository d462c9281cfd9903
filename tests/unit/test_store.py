"""PageStore over in-process providers (loopback transport): the tmem semantics, checked with checksums."""
from __future__ import annotations

import numpy as np
import pytest

from rram import PAGE_SIZE, errors
from rram.testing import inproc
from rram.testing.inproc import InProcessProvider
from rram.testing.pages import make_pages, page_checksums

FAST = ("fast_gets", "fast_remote_writes", "fast_remote_reads")
FAILOVER = ("failover_gets", "failover_remote_writes", "failover_remote_reads")
_run = {"fast": True, "seal": True, "stores": []}  # the running test's I/O path and sealing, its stores


def make_store(*args, **kwargs):
    """inproc.make_store on the I/O path and sealing the running test was parametrised with (``io_path``)."""
    kwargs.setdefault("seal", _run["seal"])
    store = inproc.make_store(*args, **kwargs)
    store.fast_path = _run["fast"]
    _run["stores"].append(store)
    return store


@pytest.fixture(autouse=True, params=["fast-sealed", "failover-sealed", "fast-plain", "failover-plain"])
def io_path(request):
    """Every test here runs four times: fast path first (the store's default), and failover path
    only, each with sealed pages (the default) and without.  Afterwards the store's counters must
    show that the path under test is the one that ran, and a sealed store that no tag failed."""
    path, sealing = request.param.split("-")
    _run["fast"] = path == "fast"
    _run["seal"] = sealing == "sealed"
    _run["stores"] = []
    yield path
    for store in _run["stores"]:
        c = store.counters
        assert (store.seal is not None) == (_run["seal"] and store.remote is not None)
        assert store.seal is None or store.seal.failures == 0
        io = c["gets"] - c["failed_gets"] + c["pages_remoted"]
        if path == "failover":
            assert sum(c[k] for k in FAST) == 0 and (sum(c[k] for k in FAILOVER) > 0 or io == 0)
        else:
            assert sum(c[k] for k in FAST) > 0 or io == 0


@pytest.fixture
def providers():
    ps = [InProcessProvider(f"p{i}", 64 << 20) for i in range(3)]
    yield ps
    for p in ps:
        p.close()


def roundtrip(store, pool, n, seed=1, obj=0):
    data = make_pages(n, seed=seed)
    store.put_many(pool, obj, np.arange(n), data)
    out = np.zeros_like(data)
    found = store.get_many(pool, obj, np.arange(n), out)
    assert found.all()
    assert np.array_equal(page_checksums(out, n), page_checksums(data, n))
    return data


@pytest.mark.parametrize("replicas", [1, 2])
def test_pages_beyond_local_budget_come_back_intact(providers, replicas):
    with make_store(providers, replicas=replicas, slab_size=2 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool()
        roundtrip(store, pool, 6000)
        s = store.stats()
        assert s["pages_remoted"] > 3000 and s["remote_pages"] > 3000
        assert s["local_pages"] + s["remote_pages"] + s["zero_pages"] == 6000
        assert s["compression_ratio"] > 1.5
        assert s["remote_leased_bytes"] == s["remote_slabs"] * (2 << 20) * replicas


def test_single_page_api_and_misses(providers):
    with make_store(providers) as store:
        pool = store.create_pool()
        page = bytes(range(256)) * 16
        store.put(pool, 3, 7, page)
        assert store.get(pool, 3, 7) == page
        assert store.get(pool, 3, 8) is None
        out = np.full(2 * PAGE_SIZE, 0xAB, dtype=np.uint8)
        found = store.get_many(pool, 3, [7, 8], out)
        assert found.tolist() == [True, False]
        assert not out[PAGE_SIZE:].any(), "a missing page reads as zeros"
        assert store.invalidate_page(pool, 3, 7)
        assert not store.invalidate_page(pool, 3, 7)
        assert store.get(pool, 3, 7) is None
        s = store.stats()
        assert s["succ_gets"] == 2 and s["failed_gets"] == 3


def test_zero_and_incompressible_pages(providers):
    with make_store(providers) as store:
        pool = store.create_pool()
        rnd = np.random.default_rng(5).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()
        store.put(pool, 0, 0, bytes(PAGE_SIZE))
        store.put(pool, 0, 1, rnd)
        assert store.get(pool, 0, 0) == bytes(PAGE_SIZE)
        assert store.get(pool, 0, 1) == rnd
        s = store.stats()
        assert s["zero_pages"] == 1 and s["local_compressed_bytes"] == PAGE_SIZE


def test_overwrite_and_invalidate_reuse_space(providers):
    with make_store(providers, slab_size=1 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool()
        roundtrip(store, pool, 3000, seed=1)
        slabs = store.stats()["remote_slabs"]
        for seed in (2, 3):  # overwriting in place must not grow the footprint without bound
            roundtrip(store, pool, 3000, seed=seed)
        assert store.stats()["remote_slabs"] <= slabs + 2
        assert store.invalidate_object(pool, 0) == 3000
        s = store.stats()
        assert s["pages"] == 0 and s["remote_pages"] == 0 and s["local_pages"] == 0
        assert s["remote_slabs"] == 0, "empty remote slabs go back to their providers"
        assert all(p.used == 0 for p in providers)
        roundtrip(store, pool, 3000, seed=4)


def test_objects_and_pools_are_separate(providers):
    with make_store(providers) as store:
        a, b = store.create_pool(), store.create_pool(persistent=False)
        store.put(a, 1, 0, b"a" * PAGE_SIZE)
        store.put(a, 2, 0, b"b" * PAGE_SIZE)
        store.put(b, 1, 0, b"c" * PAGE_SIZE)
        assert store.invalidate_object(a, 1) == 1
        assert store.get(a, 2, 0) == b"b" * PAGE_SIZE
        assert store.invalidate_pool(b) == 1
        with pytest.raises(errors.NotFound):
            store.get(b, 1, 0)


def test_persistent_put_fails_cleanly_when_everything_is_full():
    small = [InProcessProvider("tiny", 1 << 20)]
    with make_store(small, slab_size=1 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool()
        data = np.random.default_rng(1).integers(0, 256, 2000 * PAGE_SIZE, dtype=np.uint8)
        stored = 0
        with pytest.raises(errors.StoreFullError):
            for i in range(0, 2000, 100):
                store.put_many(pool, 0, np.arange(i, i + 100), data[i * PAGE_SIZE : (i + 100) * PAGE_SIZE])
                stored = i + 100
        assert stored >= 400  # local + remote held this much
        out = np.zeros(stored * PAGE_SIZE, dtype=np.uint8)
        assert store.get_many(pool, 0, np.arange(stored), out).all()
        assert np.array_equal(out, data[: stored * PAGE_SIZE]), "earlier pages are intact after a failed put"
    small[0].close()


def test_ephemeral_pages_are_dropped_not_failed():
    small = [InProcessProvider("tiny", 1 << 20)]
    with make_store(small, slab_size=1 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool(persistent=False)
        data = np.random.default_rng(2).integers(0, 256, 2000 * PAGE_SIZE, dtype=np.uint8)
        store.put_many(pool, 0, np.arange(2000), data)
        out = np.zeros_like(data)
        found = store.get_many(pool, 0, np.arange(2000), out)
        assert 0 < found.sum() < 2000
        assert store.stats()["ephemeral_dropped"] > 0
        for i in np.flatnonzero(found)[:50]:
            assert np.array_equal(out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
    small[0].close()


def test_repatriation_brings_pages_home(providers):
    with make_store(providers, slab_size=1 << 20, local_budget=4 << 20) as store:
        pool = store.create_pool()
        data = roundtrip(store, pool, 3000)
        store.invalidate_pages(pool, 0, np.arange(1500, 3000))
        remote_before = store.stats()["remote_pages"]
        assert remote_before > 0
        moved = store.repatriate(10_000)
        s = store.stats()
        assert moved > 0 and s["remote_pages"] == remote_before - moved
        assert s["pages_repatriated"] == moved
        out = np.zeros(1500 * PAGE_SIZE, dtype=np.uint8)
        assert store.get_many(pool, 0, np.arange(1500), out).all()
        assert np.array_equal(page_checksums(out, 1500), page_checksums(data, 1500)[:1500])


def test_bad_arguments(providers):
    with make_store(providers) as store:
        pool = store.create_pool()
        with pytest.raises(ValueError):
            store.put_many(pool, 0, [0, 1], bytes(PAGE_SIZE))
        with pytest.raises(ValueError):
            store.get_many(pool, 0, [0], bytearray(10))
        with pytest.raises(errors.NotFound):
            store.put(99, 0, 0, bytes(PAGE_SIZE))
        with pytest.raises(errors.RramError):
            store.put(pool, 1 << 24, 0, bytes(PAGE_SIZE))
        with pytest.raises(errors.RramError):
            store.put(pool, 0, -1, bytes(PAGE_SIZE))
    with pytest.raises(errors.RramError):
        store.get(pool, 0, 0)  # closed


def test_reads_survive_a_dead_replica(providers):
    with make_store(providers, replicas=2, slab_size=1 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool()
        data = roundtrip(store, pool, 4000)
        providers[0].kill()
        for i in range(0, 4000, 97):  # the single-page path falls back to the surviving replica
            assert store.get(pool, 0, i) == data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].tobytes()
        out = np.zeros_like(data)
        assert store.get_many(pool, 0, np.arange(4000), out).all()
        assert np.array_equal(page_checksums(out, 4000), page_checksums(data, 4000))
        assert store.stats()["providers"]["p0"] == "suspended"  # dead is the keeper's call (none here)


def repair_all(store, rounds=2000):
    for link in store.remote.links:  # what the keeper's heartbeats do: a silent provider is marked dead
        if link.alive:
            try:
                link.client.heartbeat()
            except errors.RramError as exc:
                store.provider_failed(link.index, f"heartbeat failed: {exc}")
    for _ in range(rounds):
        if store.repair(0.5) == 0:
            break
    return store.stats()


def test_rereplication_restores_copies_after_a_death(providers):
    with make_store(providers, replicas=2, slab_size=1 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool()
        data = roundtrip(store, pool, 3000)
        providers[1].kill()
        s = repair_all(store)
        assert s["degraded_slabs"] == 0 and s["slabs_rereplicated"] > 0
        # a second, different death: every page still has a live copy
        survivors = [p for p in providers if p.alive]
        survivors[0].kill()
        out = np.zeros_like(data)
        assert store.get_many(pool, 0, np.arange(3000), out).all()
        assert np.array_equal(page_checksums(out, 3000), page_checksums(data, 3000))


def test_slabs_start_degraded_with_too_few_providers_and_heal_when_one_joins(caplog):
    one = [InProcessProvider("a", 64 << 20)]
    with make_store(one, replicas=2, slab_size=1 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool()
        data = roundtrip(store, pool, 2000)
        assert store.stats()["degraded_slabs"] > 0
        assert any(r.levelname == "WARNING" and "has 1 of 2 replicas" in r.getMessage() for r in caplog.records)
        assert repair_all(store)["degraded_slabs"] > 0, "no second provider yet: stays degraded"
        from rram.datapath.remote import Link

        late = InProcessProvider("b", 64 << 20)
        client = late.client("test")
        from rram import transport

        ep = transport.requester_transport("loopback").endpoint()
        ep.connect(client.connect_data(ep.local_params()))
        link = Link(index=-1, name="b", client=client, endpoint=ep)
        store.add_provider(link)
        assert repair_all(store)["degraded_slabs"] == 0
        one[0].kill()
        out = np.zeros_like(data)
        assert store.get_many(pool, 0, np.arange(2000), out).all()
        assert np.array_equal(page_checksums(out, 2000), page_checksums(data, 2000))
        late.close()


def test_drain_moves_every_slab_off_a_provider(providers):
    with make_store(providers, replicas=1, slab_size=1 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool()
        data = roundtrip(store, pool, 4000)
        assert providers[0].used > 0
        assert store.drain("p0") > 0
        s = repair_all(store)
        assert s["providers"]["p0"] == "draining" and s["slabs_moved"] > 0
        assert providers[0].used == 0, "all leases on the drained provider are released"
        providers[0].kill()
        out = np.zeros_like(data)
        assert store.get_many(pool, 0, np.arange(4000), out).all()
        assert np.array_equal(page_checksums(out, 4000), page_checksums(data, 4000))


def test_reads_and_writes_during_a_drain(providers):
    """Pages written and read while their single copy is being moved are never stale."""
    with make_store(providers, replicas=1, slab_size=1 << 20, local_budget=1 << 20) as store:
        pool = store.create_pool()
        data = roundtrip(store, pool, 3000).copy()
        store.drain("p0")
        rng = np.random.default_rng(9)
        while store.repair(0.001):
            idx = np.sort(rng.choice(3000, 50, replace=False))
            fresh = make_pages(50, seed=int(rng.integers(1 << 30)))
            store.put_many(pool, 0, idx, fresh)
            for k, i in enumerate(idx):
                data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = fresh[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
            out = np.zeros(3000 * PAGE_SIZE, dtype=np.uint8)
            assert store.get_many(pool, 0, np.arange(3000), out).all()
            assert np.array_equal(page_checksums(out, 3000), page_checksums(data, 3000))
        assert providers[0].used == 0


def _eph_and_persistent(store, n=3000):
    """A persistent and an ephemeral pool, n pages each, most of them remote."""
    pool, eph = store.create_pool(), store.create_pool(persistent=False)
    data, eph_data = roundtrip(store, pool, n, seed=3), roundtrip(store, eph, n, seed=4)
    return pool, eph, data, eph_data


def _check_ephemeral(store, eph, eph_data, n):
    """Every ephemeral page either misses or reads back right; the found mask."""
    out = np.zeros(n * PAGE_SIZE, dtype=np.uint8)
    found = store.get_many(eph, 0, np.arange(n), out)
    assert np.array_equal(page_checksums(out, n)[found], page_checksums(eph_data, n)[found]), "wrong bytes"
    return found


def test_ephemeral_pages_live_in_one_copy_slabs_persistent_ones_in_r(providers):
    with make_store(providers, replicas=2, slab_size=1 << 20, local_budget=1 << 20) as store:
        _eph_and_persistent(store)
        slabs = store.remote.slabs.values()
        eph = [vs for vs in slabs if vs.ephemeral]
        assert eph and len(eph) < len(slabs)
        assert all(len(vs.replicas) == 1 for vs in eph)
        assert all(len(vs.replicas) == 2 and None not in vs.replicas for vs in slabs if not vs.ephemeral)
        s = store.stats()
        assert s["degraded_slabs"] == 0 and s["ephemeral_slabs"] == len(eph) and s["ephemeral_remote_pages"] > 0
        # what the providers hold: one slab per ephemeral slab, two per persistent one
        assert sum(p.used for p in providers) == (1 << 20) * (len(eph) + 2 * (len(slabs) - len(eph)))


def test_a_lost_provider_turns_its_ephemeral_pages_into_misses_persistent_ones_stay(providers):
    with make_store(providers, replicas=2, slab_size=1 << 20, local_budget=1 << 20) as store:
        n = 3000
        pool, eph, data, eph_data = _eph_and_persistent(store, n)
        on_p0 = [vs.slab_id for vs in store.remote.slabs.values() if vs.ephemeral and vs.replicas[0].link == 0]
        assert on_p0, "round robin puts some ephemeral slabs on p0"
        providers[0].kill()
        found = _check_ephemeral(store, eph, eph_data, n)  # suspended: missed, not yet forgotten
        assert 0 < found.sum() < n and store.stats()["ephemeral_unreachable"] > 0
        misses = np.flatnonzero(~found)
        assert store.get(eph, 0, int(misses[0])) is None  # the one-page path misses the same way
        store.provider_failed(0, "gone for good")  # the keeper's call: its ephemeral slabs are dropped
        s = repair_all(store)  # and the persistent ones re-replicated
        assert s["ephemeral_lost"] == n - found.sum() and s["slabs_lost"] == 0 and s["degraded_slabs"] == 0
        assert not any(sid in store.remote.slabs for sid in on_p0)
        assert np.array_equal(_check_ephemeral(store, eph, eph_data, n), found)
        out = np.zeros_like(data)
        assert store.get_many(pool, 0, np.arange(n), out).all()
        assert np.array_equal(page_checksums(out, n), page_checksums(data, n))
        # the lost keys take new pages again
        again = make_pages(len(misses), seed=5)
        store.put_many(eph, 0, misses, again)
        got = np.zeros_like(again)
        assert store.get_many(eph, 0, misses, got).all() and np.array_equal(got, again)


def test_ephemeral_puts_to_a_dead_provider_drop_the_pages_never_return_old_ones(providers):
    with make_store(providers[:1], replicas=1, slab_size=1 << 20, local_budget=1 << 20) as store:
        n = 2000
        eph = store.create_pool(persistent=False)
        roundtrip(store, eph, n, seed=6)
        providers[0].kill()
        new = make_pages(n, seed=7)
        store.put_many(eph, 0, np.arange(n), new)  # no error: what cannot be stored is dropped
        found = _check_ephemeral(store, eph, new, n)  # misses or the new bytes, never the old ones
        assert found.sum() < n and store.stats()["ephemeral_dropped"] > 0


def test_drain_and_reclaim_drop_ephemeral_slabs_instead_of_moving_them(providers):
    with make_store(providers, replicas=1, slab_size=1 << 20, local_budget=1 << 20) as store:
        n = 3000
        pool, eph, data, eph_data = _eph_and_persistent(store, n)
        mine = [vs for vs in store.remote.slabs.values() if vs.replicas[0].link == 1]
        eph_bytes = (1 << 20) * sum(vs.ephemeral for vs in mine)
        assert 0 < eph_bytes < providers[1].used
        assert store.reclaim(1, eph_bytes) == eph_bytes  # the ephemeral slabs are enough: nothing moves
        assert providers[1].used == (1 << 20) * (len(mine) - eph_bytes // (1 << 20))
        assert store.stats()["ephemeral_dropped"] > 0 and not store.remote.evicting
        moved = store.drain("p0")
        assert moved == sum(1 for vs in store.remote.slabs.values() if vs.replicas[0].link == 0)
        s = repair_all(store)
        assert providers[0].used == 0 and s["slabs_moved"] == moved
        assert 0 < _check_ephemeral(store, eph, eph_data, n).sum() < n
        out = np.zeros_like(data)
        assert store.get_many(pool, 0, np.arange(n), out).all()
        assert np.array_equal(page_checksums(out, n), page_checksums(data, n))
