"""The C batch planner (rram._ext._storepath) and the fast path against the failover path.

Each check runs the same random locations through both: the fast path's router against the
failover path's reads and writes (dead links, replicas not ready, small max_batch), StorePath
against the numpy classification, and whole stores with and without the fast path (data, counters).
"""
from __future__ import annotations

import numpy as np
import pytest

from rram import PAGE_SIZE, errors
from rram._ext._storepath import StorePath, pack_keys
from rram.datapath import keys as K
from rram.datapath import slab as L
from rram.datapath.failover import Failover
from rram.datapath.fastpath import FastPath
from rram.datapath.remote import Link, RemoteTier
from rram.testing.inproc import InProcessProvider, make_store
from rram.testing.pages import make_pages, page_checksums

FIRST = L.FIRST_REMOTE_SLAB  # first remote slab id of the tiers below
BASE = 1 << 40  # the local arena the tests' addresses pretend to lie in
PATH_COUNTERS = ("fast_gets", "failover_gets", "fast_remote_writes", "failover_remote_writes",
                 "fast_remote_reads", "failover_remote_reads")


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_pack_keys_matches_pack_many(dtype):
    idx = np.random.default_rng(1).integers(0, min(1 << 32, np.iinfo(dtype).max), 100).astype(dtype)
    assert np.array_equal(pack_keys(7, 12345, idx), K.pack_many(7, 12345, idx))
    assert pack_keys(7, 12345, idx[:0]).shape == (0,)


@pytest.mark.parametrize("bad", [
    (0, 0, [1, 2]),  # not a buffer
    (0, 0, np.arange(4.0)),  # floats
    (0, 0, np.arange(8)[::2]),  # not contiguous
    (0, 0, np.array([-1])),
    (0, 0, np.array([1 << 32])),
    (256, 0, np.arange(2)),
    (0, 1 << 24, np.arange(2)),
    (-1, 0, np.arange(2)),
    (np.uint8(200), 0, np.arange(2)),  # numpy ids: pack_many's arithmetic, whatever it is
])
def test_pack_keys_leaves_the_unusual_to_pack_many(bad):
    assert pack_keys(*bad) is None


# -- the fast path's router against the failover path --------------------------------------------


class RecordingEndpoint:
    """Executes nothing; records every posted op and completes each batch successfully."""

    read_chunk = 0  # gets post one batch a link (Endpoint.read_chunk)

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.max_outstanding = 16
        self.posted: list[np.ndarray] = []
        self.done: list[int] = []

    @property
    def outstanding(self) -> int:
        return len(self.done)

    def post(self, ops, batch_id):
        assert 1 <= len(ops) <= self.max_batch
        self.posted.append(ops.copy())
        self.done.append(batch_id)

    def poll(self, out, timeout=None):
        n = len(self.done)
        for i, batch in enumerate(self.done):
            out[i] = (batch, 0, 0)
        self.done.clear()
        return n

    def deregister_local(self, lkey):
        pass  # a suspended link gives its buffers up (RemoteTier.suspend)

    def close(self):
        pass


class StubClient:
    def close(self):
        pass

    abort = close


def random_tier(seed: int, replicas: int, nlinks: int = 4, nslabs: int = 40, dead=(), max_batch=None):
    rng = np.random.default_rng(seed)
    tier = RemoteTier(slab_size=1 << 20, replicas=replicas, first_slab_id=FIRST)
    for i in range(nlinks):
        ep = RecordingEndpoint(max_batch or int(rng.choice([4, 64, 4096])))
        tier.add_link(Link(index=-1, name=f"p{i}", client=StubClient(), endpoint=ep, lkeys={BASE: 100 + i}))
    tier._grow(FIRST + nslabs)
    slabs = np.arange(FIRST, FIRST + nslabs)
    for j in range(replicas):
        tier.rep_link[j, slabs] = np.where(rng.random(nslabs) < 0.1, -1, rng.integers(0, nlinks, nslabs))
        tier.rep_addr[j, slabs] = rng.integers(1, 1 << 40, nslabs, dtype=np.uint64) & ~np.uint64(63)
        tier.rep_rkey[j, slabs] = rng.integers(1, 1 << 31, nslabs)
        tier.rep_ready[j, slabs] = rng.random(nslabs) < 0.9
    for i in dead:
        tier.mark_dead(i, "test")
    return tier


def random_remote_locs(rng, n: int, nslabs: int) -> np.ndarray:
    slab = rng.integers(FIRST, FIRST + nslabs, n).astype(np.uint64)
    off = rng.integers(0, (1 << 20) // 64, n).astype(np.uint64)
    size = rng.integers(1, PAGE_SIZE + 1, n).astype(np.uint64)
    return (slab << np.uint64(L.SLAB_SHIFT)) | (off << np.uint64(L.OFFSET_SHIFT)) | (size << np.uint64(L.SIZE_SHIFT)) \
        | np.uint64(L.KIND_STORED)


def posted_ops(tier) -> dict[int, list[tuple]]:
    """Every op posted so far, per link, as sorted tuples (then forgotten)."""
    out = {}
    for link in tier.links:
        ops = [tuple(int(op[f]) for f in ("local_addr", "remote_addr", "length", "lkey", "rkey", "opcode"))
               for batch in link.endpoint.posted for op in batch]
        link.endpoint.posted.clear()
        if ops:
            out[link.index] = sorted(ops)
    return out


def remote_io(tier, op: str, locs, addrs, fast: bool = True) -> None:
    """``op`` ("read" or "write") as PageStore dispatches it: the fast path, else the failover path."""
    if not (fast and getattr(FastPath(tier, None, None, BASE), op)(locs, addrs, BASE)):
        getattr(Failover(tier, None, BASE, None), op)(locs, addrs, BASE)
    if op == "write":
        tier.note_missed(locs)


def run_both(tier, op: str, locs, addrs):
    """(ops, error) of the dispatch (fast path first), then of the failover path alone, for the same I/O."""
    results = []
    for fast in (True, False):
        try:
            remote_io(tier, op, locs, addrs, fast)
            err = None
        except errors.TransportError as exc:
            err = str(exc)
        results.append((posted_ops(tier), err))
    return results


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("op", ["read", "write"])
def test_router_posts_what_the_numpy_path_posts(seed, op):
    rng = np.random.default_rng(seed)
    replicas = int(rng.integers(1, 4))
    dead = tuple(rng.choice(4, int(rng.integers(0, 3)), replace=False))
    tier = random_tier(seed, replicas, dead=dead)
    for n in (1, 5, 40, 300):
        locs = random_remote_locs(rng, n, 40)
        addrs = BASE + rng.integers(0, 1 << 20, n, dtype=np.uint64)
        (fast_ops, fast_err), (failover_ops, failover_err) = run_both(tier, op, locs, addrs)
        assert fast_err == failover_err
        assert fast_ops == failover_ops


def test_router_routes_around_dead_and_unready_replicas():
    tier = random_tier(0, replicas=2, nlinks=3, nslabs=2, max_batch=4096)
    slab = FIRST
    tier.rep_link[:, slab] = [0, 1]
    tier.rep_ready[:, slab] = [False, True]
    loc = L.make_location(slab, 128, 100)
    locs = np.array([loc], dtype=np.uint64)
    addrs = np.array([BASE], dtype=np.uint64)
    router, lkeys = tier.router(BASE)
    assert router.route(False, locs, addrs, 1, lkeys) == [(1, 1)], "replica 0 is not ready"
    assert router.route(True, locs, addrs, 1, lkeys) == [(0, 1), (1, 1)], "writes go to every live replica"
    tier.mark_dead(1, "test")
    router, lkeys = tier.router(BASE)
    assert router.route(False, locs, addrs, 1, lkeys) is None, "no ready live replica: the failover path decides"
    assert router.route(True, locs, addrs, 1, lkeys) == [(0, 1)]
    op = tier._ops[0][0]
    assert (int(op["local_addr"]), int(op["remote_addr"]), int(op["length"]), int(op["lkey"]), int(op["opcode"])) \
        == (BASE, int(tier.rep_addr[0, slab]) + 128, 100, 100, 1)


def test_router_leaves_oversize_batches_and_missing_lkeys_to_the_failover_path():
    tier = random_tier(1, replicas=1, nlinks=1, nslabs=1, max_batch=4)
    tier.rep_link[0, FIRST] = 0
    tier.rep_ready[0, FIRST] = True
    locs = np.array([L.make_location(FIRST, 64 * i, 64) for i in range(5)], dtype=np.uint64)
    addrs = np.full(5, BASE, dtype=np.uint64)
    router, lkeys = tier.router(BASE)
    assert router.route(False, locs, addrs, 4, lkeys) == [(0, 4)]
    assert router.route(False, locs, addrs, 5, lkeys) is None
    router, lkeys = tier.router(BASE + 4096)  # no arena registered there
    assert router.route(False, locs, addrs, 1, lkeys) is None


def test_router_is_bound_again_when_links_or_tables_change():
    tier = random_tier(2, replicas=1, nlinks=1, nslabs=1, max_batch=64)
    tier.rep_link[0, FIRST] = 0
    tier.rep_ready[0, FIRST] = True
    locs = np.array([L.make_location(FIRST, 0, 64)], dtype=np.uint64)
    addrs = np.array([BASE], dtype=np.uint64)
    assert tier.router(BASE)[0].route(False, locs, addrs, 1, tier.router(BASE)[1]) == [(0, 1)]
    tier.add_link(Link(index=-1, name="new", client=StubClient(), endpoint=RecordingEndpoint(64), lkeys={BASE: 9}))
    tier._grow(FIRST + 500)  # new arrays: the old pointers must not be used
    tier.rep_link[0, FIRST + 400] = 1
    tier.rep_ready[0, FIRST + 400] = True
    far = np.array([L.make_location(FIRST + 400, 0, 64)], dtype=np.uint64)
    router, lkeys = tier.router(BASE)
    assert router.route(False, far, addrs, 1, lkeys) == [(1, 1)]
    tier.mark_dead(1, "test")
    router, lkeys = tier.router(BASE)
    assert router.route(False, far, addrs, 1, lkeys) is None


def test_a_failing_link_mid_batch_falls_back_and_suspends_it():
    tier = random_tier(3, replicas=2, nlinks=2, nslabs=1, max_batch=64)
    tier.rep_link[:, FIRST] = [0, 1]
    tier.rep_ready[:, FIRST] = True
    broken = tier.links[0].endpoint

    def refuse(ops, batch_id):
        raise errors.ConnectionLost("gone")

    broken.post = refuse
    locs = np.array([L.make_location(FIRST, 64 * i, 64) for i in range(3)], dtype=np.uint64)
    addrs = np.full(3, BASE, dtype=np.uint64)
    remote_io(tier, "read", locs, addrs)
    assert tier.links[0].suspended and tier.counters["providers_suspended"] == 1  # dead: the keeper's call
    assert [len(b) for b in tier.links[1].endpoint.posted] == [3], "the pages were read from the other replica"
    tier.links[1].endpoint.posted.clear()
    remote_io(tier, "write", locs, addrs)
    assert [len(b) for b in tier.links[1].endpoint.posted] == [3]
    assert tier.links[0].missed == {FIRST}, "the suspended copy missed that write"


# -- StorePath against the numpy classification ----------------------------------------------------


def random_batch_locs(rng, n: int, last_local: int, nslabs: int) -> np.ndarray:
    """Absent, zero, local and remote locations, mixed."""
    locs = random_remote_locs(rng, n, nslabs)
    local = rng.random(n) < 0.4
    slab = rng.integers(1, last_local + 1, n).astype(np.uint64)
    locs[local] = (locs[local] & ~np.uint64(L.SLAB_MASK)) | (slab[local] << np.uint64(L.SLAB_SHIFT))
    kind = rng.random(n)
    locs[kind < 0.15] = 0
    locs[(kind >= 0.15) & (kind < 0.3)] = L.ZERO_LOCATION
    return locs


@pytest.mark.parametrize("seed", range(8))
def test_plan_get_matches_the_numpy_classification(seed):
    rng = np.random.default_rng(seed)
    last_local, batch, staging = 3, 256, 1 << 44
    local_base = np.array([0, 1 << 30, 2 << 30, 3 << 30], dtype=np.uint64)
    path = StorePath(local_base, last_local, staging, batch)
    tier = random_tier(seed, replicas=2, dead=(0,) if seed % 2 else (), max_batch=4096)
    router, lkeys = tier.router(staging)
    lkeys[:] = np.arange(len(lkeys))  # pretend the staging arena is registered
    for n in (1, 7, 256):
        locs = random_batch_locs(rng, n, last_local, 40)
        found = np.empty(n, dtype=bool)
        batches = path.plan_get(locs, n, found, router, lkeys)
        kind = L.loc_kind(locs)
        stored = kind == L.KIND_STORED
        local = stored & (L.loc_slab(locs) <= last_local)
        remote = stored & ~local
        if batches is None:  # some remote page has no ready replica on a live link
            with pytest.raises(errors.TransportError):
                Failover(tier, None, staging, None).read(
                    np.ascontiguousarray(locs[remote]), staging + np.flatnonzero(remote).astype(np.uint64) * PAGE_SIZE,
                    staging)
            continue
        assert np.array_equal(found, kind != L.KIND_ABSENT)
        assert np.array_equal(path.sizes[:n], np.where(stored, L.loc_size(locs), 0))
        srcs = np.zeros(n, dtype=np.uint64)
        srcs[local] = local_base[L.loc_slab(locs[local]).astype(np.intp)] + L.loc_offset(locs[local])
        srcs[remote] = staging + np.flatnonzero(remote).astype(np.uint64) * PAGE_SIZE
        assert np.array_equal(path.srcs[:n], srcs)
        assert (path.found, path.local, path.remote) == (int(found.sum()), int(local.sum()), int(remote.sum()))
        assert sum(count for _, count in batches) == int(remote.sum())


def test_plan_get_without_a_remote_tier():
    path = StorePath(np.array([0, 1 << 30], dtype=np.uint64), 1, 1 << 44, 16)
    locs = np.array([0, L.ZERO_LOCATION, L.make_location(1, 64, 10)], dtype=np.uint64)
    found = np.empty(3, dtype=bool)
    assert path.plan_get(locs, 3, found, None, None) == []
    assert found.tolist() == [False, True, True] and path.srcs[2] == (1 << 30) + 64
    remote = np.array([L.make_location(5, 0, 10)], dtype=np.uint64)
    assert path.plan_get(remote, 1, found, None, None) is None
    with pytest.raises(ValueError):
        path.plan_get(np.zeros(17, dtype=np.uint64), 17, np.empty(17, dtype=bool), None, None)


def test_put_and_free_bookkeeping_match_numpy():
    rng = np.random.default_rng(5)
    last_local, staging, n = 3, 1 << 44, 200
    arena = np.zeros(4 << 16, dtype=np.uint8)
    local_base = arena.ctypes.data + np.arange(4, dtype=np.uint64) * np.uint64(1 << 16)
    path = StorePath(local_base, last_local, staging, 256)
    sizes = rng.integers(0, 3, n).astype(np.uint32) * 100
    keys = rng.integers(0, 1 << 40, n).astype(np.uint64)
    m = path.split_put(sizes, keys, n)
    assert np.array_equal(path.zero_keys[: n - m], keys[sizes == 0])
    assert np.array_equal(path.nz_keys[:m], keys[sizes != 0])
    assert np.array_equal(path.nz_sizes[:m], sizes[sizes != 0])
    assert np.array_equal(path.nz_srcs[:m], staging + np.flatnonzero(sizes).astype(np.uint64) * PAGE_SIZE)

    locs = random_batch_locs(rng, n, last_local, 40)
    out = np.zeros(n, dtype=np.uint64)
    nl, nr = path.split_free(locs, n, out)
    stored = L.loc_kind(locs) == L.KIND_STORED
    local = stored & (L.loc_slab(locs) <= last_local)
    assert np.array_equal(out[:nl], locs[local]) and np.array_equal(out[nl : nl + nr], locs[stored & ~local])

    slots = np.array([L.make_location(1 + i % 3, 64 * i, 64) for i in range(8)], dtype=np.uint64)
    addrs = np.zeros(8, dtype=np.uint64)
    path.local_addrs(slots, 8, addrs)
    assert np.array_equal(addrs, local_base[L.loc_slab(slots).astype(np.intp)] + L.loc_offset(slots))
    with pytest.raises(ValueError):
        path.local_addrs(np.array([L.make_location(4, 0, 64)], dtype=np.uint64), 1, addrs)
    src = np.arange(8 * 64, dtype=np.uint8) % 251
    srcs = src.ctypes.data + np.arange(8, dtype=np.uint64) * np.uint64(64)
    path.copy_local(slots, srcs, np.full(8, 64, dtype=np.uint32), 8)
    for i in range(8):
        at = int(addrs[i]) - arena.ctypes.data
        assert np.array_equal(arena[at : at + 64], src[i * 64 : (i + 1) * 64])


# -- whole stores: fast path on and off ----------------------------------------------------------


@pytest.mark.parametrize("replicas", [1, 2])
def test_stores_with_and_without_the_fast_path_agree(replicas):
    results = []
    for fast in (True, False):
        providers = [InProcessProvider(f"p{i}", 64 << 20) for i in range(3)]
        try:
            with make_store(providers, replicas=replicas, slab_size=1 << 20, local_budget=1 << 20) as store:
                store.fast_path = fast
                pool = store.create_pool()
                rng = np.random.default_rng(replicas)
                n = 1500
                data = make_pages(n, seed=3)
                store.put_many(pool, 0, np.arange(n), data)
                sums = []
                for step in range(60):
                    idx = np.unique(rng.integers(0, n + 50, int(rng.integers(1, 65))))
                    if step % 3 == 0:
                        fresh = make_pages(len(idx), seed=100 + step)
                        store.put_many(pool, 0, idx, fresh)
                    out = np.zeros(len(idx) * PAGE_SIZE, dtype=np.uint8)
                    found = store.get_many(pool, 0, idx, out)
                    sums.append((found.tolist(), page_checksums(out, len(idx)).tolist()))
                    if step == 30:
                        providers[0].kill()  # the next remote batch on p0 fails and falls back
                        if replicas == 1:
                            break
                stats = store.stats()
                assert (stats["fast_gets"] > 0) == fast and (stats["failover_gets"] > 0 or fast)
                for k in ("providers", "route_generation", "providers_lost", "providers_suspended", "read_retries",
                          *PATH_COUNTERS):
                    stats.pop(k)
                results.append((sums, stats))
        finally:
            for p in providers:
                p.close()
    assert results[0] == results[1]
