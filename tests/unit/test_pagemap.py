"""The compact page map (ext/_pagemap.pyx) against a dict model."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rram.datapath import keys as K
from rram.datapath import slab as L
from rram.datapath.pagemap import PageMap, items, object_range, pool_range

U64 = np.uint64


def arr(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def store(m: PageMap, keys, locs) -> list[int]:
    old = np.zeros(len(keys), dtype=np.uint64)
    m.store(arr(keys), arr(locs), old)
    return old.tolist()


def test_store_lookup_remove():
    m = PageMap()
    k = [K.pack(1, 2, i) for i in (0, 1, 511, 512, 5000)]
    assert store(m, k, [10, 11, 12, 13, 14]) == [0] * 5
    assert store(m, k[:2], [20, 0]) == [10, 11]  # 0 removes
    out = np.zeros(6, dtype=np.uint64)
    assert m.lookup(arr(k + [K.pack(1, 3, 0)]), out) == 4
    assert out.tolist() == [20, 0, 12, 13, 14, 0]
    old = np.zeros(3, dtype=np.uint64)
    assert m.remove(arr([k[0], k[0], k[1]]), old) == 1 and old.tolist() == [20, 0, 0]
    assert len(m) == 3 and m.chunk_count == 3 and m.object_count == 1


def test_duplicate_keys_in_a_batch_apply_in_order():
    m = PageMap()
    assert store(m, [7, 7, 7], [1, 2, 0]) == [0, 1, 2]
    assert len(m) == 0 and m.chunk_count == 0


def test_scalar_get_set():
    m = PageMap()
    key = K.pack(255, K.MAX_OBJECTS - 1, K.MAX_INDEX - 1)
    assert m.set(key, 99) == 0 and m.get(key) == 99
    assert m.set(key, 100) == 99 and m.set(key, 0) == 100
    assert m.get(key) == 0 and len(m) == 0 and m.metadata_bytes() < 4096


def test_cas():
    m = PageMap()
    store(m, [1, 2, 3], [10, 20, 30])
    ok = np.zeros(4, dtype=np.uint8)
    assert m.cas(arr([1, 2, 3, 4]), arr([10, 99, 30, 0]), arr([11, 21, 0, 40]), ok) == 3
    assert ok.tolist() == [1, 0, 1, 1]
    assert [m.get(k) for k in (1, 2, 3, 4)] == [11, 20, 0, 40]


def test_chunks_and_objects_are_freed_with_their_last_entry():
    m = PageMap()
    keys = K.pack_many(3, 9, np.arange(0, 4096, 3))
    store(m, keys, keys + U64(1))
    assert m.chunk_count == 8 and m.object_count == 1
    empty = m.metadata_bytes()
    old = np.zeros(len(keys), dtype=np.uint64)
    assert m.remove(keys, old) == len(keys) and (old == keys + U64(1)).all()
    assert len(m) == 0 and m.chunk_count == 0 and m.object_count == 0
    assert m.metadata_bytes() < empty


def test_remove_range_objects_and_pools():
    m = PageMap()
    keys = np.concatenate([K.pack_many(p, o, [0, 1, 600, K.MAX_INDEX - 1]) for p in (0, 7, 255) for o in (0, 5, K.MAX_OBJECTS - 1)])
    store(m, keys, keys | U64(2))
    rk, rl = m.remove_range(*object_range(7, 5))
    assert rk.tolist() == K.pack_many(7, 5, [0, 1, 600, K.MAX_INDEX - 1]).tolist() and (rl == rk | U64(2)).all()
    rk, _ = m.remove_range(*pool_range(255))  # hi = 2**64
    assert len(rk) == 12 and (rk >> U64(56) == 255).all()
    rk, _ = m.remove_range(K.pack(0, 5, 1), K.pack(0, 5, 601))  # part of an object
    assert rk.tolist() == [K.pack(0, 5, 1), K.pack(0, 5, 600)]
    rk, _ = m.remove_range(0, 1 << 64)
    assert len(rk) == len(keys) - 4 - 12 - 2 and len(m) == 0 and m.object_count == 0
    assert len(m.remove_range(5, 5)[0]) == 0
    with pytest.raises(ValueError):
        m.remove_range(0, (1 << 64) + 1)
    with pytest.raises(ValueError):
        m.remove_range(-1, 5)


def test_select_by_slab_in_key_order():
    m = PageMap()
    keys = K.pack_many(1, 1, np.arange(2000))
    slabs = (np.arange(2000) % 3 + 1).astype(np.uint64)
    locs = (slabs << U64(L.SLAB_SHIFT)) | U64(L.KIND_STORED) | U64(100 << L.SIZE_SHIFT)
    store(m, keys[::-1].copy(), locs[::-1].copy())
    want = keys[slabs == 2]
    k, lo = m.select(L.SLAB_MASK, 2 << L.SLAB_SHIFT)
    assert k.tolist() == want.tolist() and (L.loc_slab(lo) == 2).all()
    k, _ = m.select(L.SLAB_MASK, U64(2) << U64(L.SLAB_SHIFT), 10, int(want[5]))
    assert k.tolist() == want[5:15].tolist()
    assert items(m)[0].tolist() == keys.tolist()
    with pytest.raises(ValueError):
        m.select(0, 0, -1)


def test_bad_arguments():
    m = PageMap()
    with pytest.raises(ValueError, match="old_out"):
        m.store(arr([1, 2]), arr([1, 2]), np.zeros(1, dtype=np.uint64))
    with pytest.raises(ValueError):
        m.lookup(np.array([1], dtype=np.int64), np.zeros(1, dtype=np.uint64))
    with pytest.raises(OverflowError):
        m.get(-1)
    with pytest.raises(ValueError, match="ok_out"):
        m.cas(arr([1]), arr([1]), arr([1]), np.zeros(0, dtype=np.uint8))


def test_dense_pages_cost_about_eight_bytes():
    m = PageMap()
    keys = K.pack_many(0, 1, np.arange(1 << 16))
    store(m, keys, keys | U64(1))
    assert m.metadata_bytes() / len(m) < 8.5


def test_read_only_inputs_are_accepted():
    m = PageMap()
    keys = arr([1, 2])
    keys.flags.writeable = False
    store(m, keys, [5, 6])
    out = np.zeros(2, dtype=np.uint64)
    assert m.lookup(keys, out) == 2


# -- stateful model check ---------------------------------------------------------------------

INDEXES = st.one_of(st.integers(0, 1100), st.integers(K.MAX_INDEX - 600, K.MAX_INDEX - 1))
KEYS = st.builds(K.pack, st.sampled_from([0, 1, 255]), st.sampled_from([0, 1, K.MAX_OBJECTS - 1]), INDEXES)
LOCS = st.one_of(st.just(0), st.integers(1, (1 << 64) - 1), st.sampled_from([1, 2, 6, 1 << 37 | 2]))
BOUNDS = st.one_of(KEYS, st.sampled_from([0, 1 << 56, 1 << 32, 255 << 56, 1 << 64]), st.integers(0, 1 << 64))


class PageMapMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = PageMap()
        self.model: dict[int, int] = {}

    @rule(pairs=st.lists(st.tuples(KEYS, LOCS), max_size=30))
    def store(self, pairs):
        keys = [k for k, _ in pairs]
        locs = [v for _, v in pairs]
        old = store(self.m, keys, locs)
        for k, v, o in zip(keys, locs, old):
            assert self.model.get(k, 0) == o
            if v:
                self.model[k] = v
            else:
                self.model.pop(k, None)

    @rule(keys=st.lists(KEYS, max_size=30))
    def remove(self, keys):
        old = np.zeros(len(keys), dtype=np.uint64)
        n = self.m.remove(arr(keys), old)
        want = [self.model.pop(k, 0) for k in keys]
        assert old.tolist() == want and n == sum(1 for w in want if w)

    @rule(data=st.data(), n=st.integers(0, 20))
    def cas(self, data, n):
        keys = data.draw(st.lists(KEYS, min_size=n, max_size=n))
        expected = [self.model.get(k, 0) if data.draw(st.booleans()) else data.draw(LOCS) for k in keys]
        new = data.draw(st.lists(LOCS, min_size=n, max_size=n))
        ok = np.zeros(n, dtype=np.uint8)
        done = self.m.cas(arr(keys), arr(expected), arr(new), ok)
        for k, e, v, flag in zip(keys, expected, new, ok.tolist()):
            assert flag == (self.model.get(k, 0) == e)
            if flag:
                if v:
                    self.model[k] = v
                else:
                    self.model.pop(k, None)
        assert done == int(ok.sum())

    @rule(key=KEYS, loc=LOCS)
    def set_one(self, key, loc):
        assert self.m.set(key, loc) == self.model.get(key, 0)
        if loc:
            self.model[key] = loc
        else:
            self.model.pop(key, None)

    @rule(lo=BOUNDS, hi=BOUNDS)
    def remove_range(self, lo, hi):
        lo = min(lo, (1 << 64) - 1)
        keys, locs = self.m.remove_range(lo, hi)
        want = sorted(k for k in self.model if lo <= k < hi)
        assert keys.tolist() == want
        assert locs.tolist() == [self.model.pop(k) for k in want]

    @rule(mask=st.sampled_from([0, 3, L.SLAB_MASK, (1 << 64) - 1]), data=st.data(),
          limit=st.integers(0, 5), start=st.one_of(st.just(0), KEYS))
    def select(self, mask, data, limit, start):
        value = data.draw(st.sampled_from(sorted({v & mask for v in self.model.values()} | {0, 2})))
        keys, locs = self.m.select(mask, value, limit, start)
        want = [k for k in sorted(self.model) if k >= start and self.model[k] & mask == value]
        if limit:
            want = want[:limit]
        assert keys.tolist() == want and locs.tolist() == [self.model[k] for k in want]

    @invariant()
    def matches_model(self):
        assert len(self.m) == len(self.model)
        keys, locs = items(self.m)
        assert keys.tolist() == sorted(self.model)
        assert locs.tolist() == [self.model[k] for k in sorted(self.model)]
        assert self.m.chunk_count == len({k >> 9 for k in self.model})
        assert self.m.object_count == len({k >> 32 for k in self.model})
        probe = arr(list(self.model)[:20] + [K.pack(1, 1, 2000)])
        out = np.zeros(len(probe), dtype=np.uint64)
        assert self.m.lookup(probe, out) == len(probe) - 1
        assert out.tolist() == [self.model.get(k, 0) for k in probe.tolist()]


TestPageMapMachine = PageMapMachine.TestCase
TestPageMapMachine.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
