"""The size-class slot allocator (ext/_slab.pyx) and the location layout (rram.datapath.slab)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rram.datapath import slab as L
from rram.errors import NotFound, RramError

BLOCK = L.BLOCK_SIZE


def alloc(a: L.SlotAllocator, sizes, owners=None) -> np.ndarray:
    sizes = np.asarray(sizes, dtype=np.uint32)
    out = np.zeros(len(sizes), dtype=np.uint64)
    if a.track_owners and owners is None:
        owners = np.arange(1, len(sizes) + 1, dtype=np.uint64)
    got = a.alloc(sizes, out, owners)
    return out[:got]


def slot_bytes(size) -> int:
    return L.size_class(int(size)) * L.GRANULE


# -- location layout ------------------------------------------------------------------------


def test_layout_matches_architecture():
    loc = L.make_location(slab=5, offset=128, size=4096)
    assert loc == (5 << 37) | (2 << 15) | (4096 << 2) | 2
    assert (L.loc_kind(loc), L.loc_size(loc), L.loc_offset(loc), L.loc_slab(loc)) == (L.KIND_STORED, 4096, 128, 5)
    assert L.loc_kind(L.ZERO_LOCATION) == L.KIND_ZERO and L.loc_kind(0) == L.KIND_ABSENT
    assert L.SLAB_MASK == ((1 << 24) - 1) << 37 and L.SLAB_MASK >> 61 == 0


def test_every_compiled_user_has_the_one_layout():
    from rram._ext import _slab, _storepath

    assert _slab.LAYOUT == _storepath.LAYOUT
    assert {k: getattr(L, k) for k in _slab.LAYOUT} == _slab.LAYOUT
    # what the C allocator hands out decodes the same in Python
    a = L.SlotAllocator()
    a.add_slab(L.FIRST_REMOTE_SLAB + 3, 4 * BLOCK)
    (loc,) = alloc(a, [1000]).tolist()
    assert L.loc_slab(loc) == L.FIRST_REMOTE_SLAB + 3 and L.loc_size(loc) == 1000 and L.is_remote(loc)


def test_local_remote_split_is_the_first_remote_slab():
    first = L.FIRST_REMOTE_SLAB
    locs = np.array([0, L.ZERO_LOCATION, L.make_location(1, 0, 64), L.make_location(first - 1, 64, 64),
                     L.make_location(first, 0, 64), L.make_location(L.MAX_SLAB_ID, 0, 4096)], dtype=np.uint64)
    assert L.is_remote(locs).tolist() == [False, False, False, False, True, True]
    assert L.is_local(locs).tolist() == [False, False, True, True, False, False]
    assert [bool(L.is_remote(int(x))) for x in locs] == L.is_remote(locs).tolist()
    from rram.datapath.remote import RemoteTier

    with pytest.raises(ValueError, match=f"start at {first}"):
        RemoteTier(slab_size=1 << 20, replicas=1, first_slab_id=first - 1)


@given(st.lists(st.tuples(st.integers(1, L.MAX_SLAB_ID), st.integers(0, L.MAX_SLAB_SIZE // 64 - 1),
                          st.integers(1, 4096)), min_size=1, max_size=20))
def test_vectorised_accessors_agree_with_scalar(parts):
    locs = np.array([L.make_location(s, o * 64, z) for s, o, z in parts], dtype=np.uint64)
    for fn in (L.loc_kind, L.loc_size, L.loc_offset, L.loc_slab):
        vec = fn(locs)
        assert vec.dtype == np.uint64
        assert vec.tolist() == [fn(int(x)) for x in locs]
        assert int(fn(locs[0])) == fn(int(locs[0]))  # numpy scalars too
    assert L.loc_slab(locs).tolist() == [s for s, _, _ in parts]


@pytest.mark.parametrize("args", [(0, 0, 1), (1 << 24, 0, 1), (1, 32, 1), (1, L.MAX_SLAB_SIZE, 1), (1, 0, 0), (1, 0, L.MAX_STORED_SIZE + 1)])
def test_make_location_rejects_bad_fields(args):
    with pytest.raises(ValueError):
        L.make_location(*args)


def test_allocator_locations_decode_with_python_layout():
    a = L.SlotAllocator()
    a.add_slab(77, 4 * BLOCK)
    sizes = [1, 64, 65, 100, 2000, 4095, 4096]
    locs = alloc(a, sizes)
    assert L.loc_size(locs).tolist() == sizes
    assert set(L.loc_slab(locs).tolist()) == {77}
    assert (L.loc_kind(locs) == L.KIND_STORED).all()
    for loc, size in zip(locs.tolist(), sizes):
        off = L.loc_offset(loc)
        # a slot of class c sits at a multiple of c*64 inside its 64 KiB block
        assert (off % BLOCK) % slot_bytes(size) == 0
        assert off // BLOCK == (off + slot_bytes(size) - 1) // BLOCK


# -- behaviour --------------------------------------------------------------------------------


def test_fills_oldest_slab_first_and_prefers_partial_blocks():
    a = L.SlotAllocator()
    a.add_slab(9, 2 * BLOCK)
    a.add_slab(3, 2 * BLOCK)
    locs = alloc(a, [4096] * 32)  # two blocks of 16 slots in slab 9, then slab 3
    assert L.loc_slab(locs).tolist() == [9] * 32
    more = alloc(a, [4096])
    assert L.loc_slab(more).tolist() == [3]
    a.free(locs[:1])
    again = alloc(a, [4096])  # the partly used block of slab 9 before the rest of slab 3
    assert again.tolist() == locs[:1].tolist()


def test_free_block_changes_class():
    a = L.SlotAllocator()
    a.add_slab(1, BLOCK)
    small = alloc(a, [64] * 1024)
    assert len(small) == 1024 and not a.can_fit(4096) and not a.can_fit(64)
    assert a.stats()["class_blocks"] == {1: 1}
    a.free(small)
    assert a.stats()["class_blocks"] == {} and a.free_bytes == BLOCK
    big = alloc(a, [4096] * 17)
    assert len(big) == 16
    assert a.stats()["class_blocks"] == {64: 1}


def test_capacity_accounting_and_stop_at_first_misfit():
    a = L.SlotAllocator(track_owners=True)
    a.add_slab(1, BLOCK)
    out = np.zeros(4, dtype=np.uint64)
    got = a.alloc(np.array([4096, 64, 4096, 4096], dtype=np.uint32), out, np.arange(4, dtype=np.uint64))
    assert got == 1  # the 64-byte page needs a second block: stop there, keep order
    s = a.stats()
    assert (s["slots_used"], s["bytes_stored"], s["slot_bytes"], s["bytes_in_blocks"]) == (1, 4096, 4096, BLOCK)
    assert a.capacity_bytes == BLOCK and a.free_bytes == BLOCK - 4096
    assert a.slab_used_bytes(1) == 4096


def test_retired_slab_takes_nothing_new_and_is_removed_when_empty():
    a = L.SlotAllocator()
    a.add_slab(1, BLOCK)
    a.add_slab(2, BLOCK)
    first = alloc(a, [2048])
    a.retire_slab(1)
    a.retire_slab(1)  # idempotent
    assert a.capacity_bytes == BLOCK and a.retired_slabs() == [1]
    more = alloc(a, [2048] * 40)
    assert len(more) == 32 and set(L.loc_slab(more).tolist()) == {2}
    with pytest.raises(RramError, match="still holds 1"):
        a.remove_slab(1)
    a.free(first)
    assert a.empty_slabs() == [1]
    a.remove_slab(1)
    assert a.slab_ids() == [2]
    with pytest.raises(NotFound):
        a.retire_slab(1)
    with pytest.raises(RramError, match="slab"):
        a.free(first)  # its slab is gone


def test_slab_ids_are_reusable_after_remove():
    a = L.SlotAllocator()
    a.add_slab(5, BLOCK)
    a.remove_slab(5)
    a.add_slab(5, 2 * BLOCK)
    assert a.capacity_bytes == 2 * BLOCK and len(alloc(a, [4096] * 40)) == 32


def test_free_is_all_or_nothing():
    a = L.SlotAllocator()
    a.add_slab(1, 4 * BLOCK)
    locs = alloc(a, [100, 200, 300])
    before = a.stats()
    batch = np.array([locs[0], L.ZERO_LOCATION, 0, locs[1], locs[1]], dtype=np.uint64)
    with pytest.raises(RramError, match=r"locs\[4\].*double free"):
        a.free(batch)
    assert a.stats() == before
    a.free(batch[:4])
    assert a.stats()["slots_used"] == 1
    with pytest.raises(RramError, match="double free"):
        a.free(locs[:1])


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda loc: loc | 3, "not a page location"),
        (lambda loc: loc | (1 << 62), "not a page location"),
        (lambda loc: (loc & ~L.SLAB_MASK) | (99 << L.SLAB_SHIFT), "slab"),
        (lambda loc: loc + (1 << L.OFFSET_SHIFT), "start of a slot"),
        (lambda loc: loc + (1 << L.SIZE_SHIFT), "size"),
        (lambda loc: loc + (3 * 1024 << L.OFFSET_SHIFT), "no allocated slots"),
    ],
)
def test_free_rejects_foreign_locations(mutate, reason):
    a = L.SlotAllocator()
    a.add_slab(1, 4 * BLOCK)
    (loc,) = alloc(a, [1000]).tolist()
    with pytest.raises(RramError, match=reason):
        a.free(np.array([mutate(loc)], dtype=np.uint64))
    a.free(np.array([loc], dtype=np.uint64))


def test_bad_arguments():
    a = L.SlotAllocator(track_owners=True)
    for slab_id, size in [(0, BLOCK), (1 << 24, BLOCK), (1, 0), (1, BLOCK + 64), (1, L.MAX_SLAB_SIZE + BLOCK)]:
        with pytest.raises(ValueError):
            a.add_slab(slab_id, size)
    a.add_slab(1, L.MAX_SLAB_SIZE)
    with pytest.raises(RramError, match="already"):
        a.add_slab(1, BLOCK)
    out = np.zeros(4, dtype=np.uint64)
    own = np.zeros(4, dtype=np.uint64)
    with pytest.raises(ValueError, match=r"sizes\[2\] = 4113"):
        a.alloc(np.array([1, 2, 4113, 3], dtype=np.uint32), out, own)
    with pytest.raises(ValueError, match=r"sizes\[0\] = 0"):
        a.alloc(np.array([0], dtype=np.uint32), out, own)
    assert a.stats()["slots_used"] == 0  # nothing allocated by a rejected batch
    with pytest.raises(ValueError, match="owners"):
        a.alloc(np.array([1], dtype=np.uint32), out)
    with pytest.raises(ValueError, match="n=5"):
        a.alloc(np.ones(4, dtype=np.uint32), out, own, 5)
    with pytest.raises(ValueError):
        a.alloc(np.ones(4, dtype=np.int64), out, own)  # wrong dtype
    with pytest.raises(ValueError):
        a.can_fit(0)
    with pytest.raises(RramError, match="does not track"):
        L.SlotAllocator().owners(out, out)
    with pytest.raises(NotFound):
        a.remove_slab(2)


def test_owners_follow_slots():
    a = L.SlotAllocator(track_owners=True)
    a.add_slab(1, 2 * BLOCK)
    keys = np.array([11, 22, 33], dtype=np.uint64)
    locs = alloc(a, [10, 3000, 64], keys)
    out = np.zeros(4, dtype=np.uint64)
    a.owners(np.append(locs, np.uint64(L.ZERO_LOCATION)), out)
    assert out.tolist() == [11, 22, 33, 0]
    a.free(locs[1:2])
    with pytest.raises(RramError, match="allocated"):
        a.owners(locs, out)


def test_pick_victims_walks_the_pool_fairly():
    a = L.SlotAllocator(track_owners=True)
    a.add_slab(1, 4 * BLOCK)
    a.add_slab(2, 4 * BLOCK)
    rng = np.random.default_rng(7)
    sizes = rng.choice([100, 1000, 3000, 4096], 150).astype(np.uint32)
    keys = np.arange(1000, 1150, dtype=np.uint64)
    locs = alloc(a, sizes, keys)
    assert len(locs) == 150
    by_loc = dict(zip(locs.tolist(), keys.tolist()))
    out = np.zeros(40, dtype=np.uint64)
    own = np.zeros(40, dtype=np.uint64)
    seen = []
    for k in (40, 40, 40, 30):  # one lap: each of the 150 slots exactly once
        got = a.pick_victims(k, out, own)
        assert got == k
        seen += list(zip(out[:got].tolist(), own[:got].tolist()))
    assert len(seen) == 150 and dict(seen) == by_loc
    got = a.pick_victims(40, out, own)  # the hand keeps going: the lap starts again
    assert got == 40 and out.tolist() == [loc for loc, _ in seen[:40]]
    # a lap never repeats a slot within one call
    assert a.pick_victims(40, np.zeros(400, dtype=np.uint64)[:40], None) == 40
    big = np.zeros(400, dtype=np.uint64)
    got = a.pick_victims(400, big, np.zeros(400, dtype=np.uint64))
    assert got == 150 and len(set(big[:got].tolist())) == 150
    # evicting what comes out eventually empties the pool
    for _ in range(10):
        got = a.pick_victims(40, out, own)
        a.free(out[:got])
    assert a.stats()["slots_used"] == 0 and a.pick_victims(40, out, own) == 0
    assert a.empty_slabs() == [1, 2]


def test_fills_a_big_slab_and_reuses_freed_space():
    a = L.SlotAllocator()
    a.add_slab(1, 16 << 20)
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 4097, 20000).astype(np.uint32)
    locs = alloc(a, sizes)
    n = len(locs)
    assert 0 < n < 20000 and a.stats()["bytes_stored"] == int(sizes[:n].sum())
    a.free(locs[::2])
    again = alloc(a, sizes[:n:2])
    assert len(again) == len(locs[::2])


# -- stateful model check ---------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """The allocator against a dict of live slots: no overlap, in bounds, exact accounting."""

    def __init__(self):
        super().__init__()
        self.a = L.SlotAllocator(track_owners=True)
        self.slabs: dict[int, int] = {}  # id -> size
        self.retired: set[int] = set()
        self.live: dict[int, tuple[int, int]] = {}  # loc -> (size, owner)
        self.next_owner = 1

    @rule(slab_id=st.integers(1, 40), blocks=st.integers(1, 4))
    def add_slab(self, slab_id, blocks):
        if slab_id in self.slabs:
            with pytest.raises(RramError):
                self.a.add_slab(slab_id, blocks * BLOCK)
            return
        self.a.add_slab(slab_id, blocks * BLOCK)
        self.slabs[slab_id] = blocks * BLOCK

    @precondition(lambda self: self.slabs)
    @rule(data=st.data())
    def retire(self, data):
        slab_id = data.draw(st.sampled_from(sorted(self.slabs)))
        self.a.retire_slab(slab_id)
        self.retired.add(slab_id)

    @precondition(lambda self: self.slabs)
    @rule(data=st.data())
    def remove(self, data):
        slab_id = data.draw(st.sampled_from(sorted(self.slabs)))
        if any(L.loc_slab(loc) == slab_id for loc in self.live):
            with pytest.raises(RramError):
                self.a.remove_slab(slab_id)
        else:
            self.a.remove_slab(slab_id)
            del self.slabs[slab_id]
            self.retired.discard(slab_id)

    @rule(sizes=st.lists(st.one_of(st.integers(1, 4096), st.sampled_from([64, 65, 2048, 4096])), min_size=1, max_size=40))
    def alloc(self, sizes):
        owners = np.arange(self.next_owner, self.next_owner + len(sizes), dtype=np.uint64)
        self.next_owner += len(sizes)
        locs = alloc(self.a, sizes, owners)
        for loc, size, owner in zip(locs.tolist(), sizes, owners.tolist()):
            assert loc not in self.live and L.loc_size(loc) == size
            assert L.loc_slab(loc) not in self.retired
            self.live[loc] = (size, owner)
        if len(locs) < len(sizes):
            self.check_no_room_for(sizes[len(locs)])

    def check_no_room_for(self, size):
        """A refused size had no partly free block of its class and no free block anywhere."""
        assert not self.a.can_fit(size)
        cls = L.size_class(size)
        blocks: dict[tuple[int, int], list[int]] = {}
        for loc, (sz, _) in self.live.items():
            blocks.setdefault((L.loc_slab(loc), L.loc_offset(loc) // BLOCK), []).append(L.size_class(sz))
        for slab_id, size_bytes in self.slabs.items():
            if slab_id in self.retired:
                continue
            for b in range(size_bytes // BLOCK):
                classes = blocks.get((slab_id, b))
                assert classes, f"free block {b} of slab {slab_id} was not used"
                assert set(classes) != {cls} or len(classes) == 1024 // cls

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        locs = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True, max_size=30))
        batch = locs + [L.ZERO_LOCATION, 0]
        self.a.free(np.array(batch, dtype=np.uint64))
        for loc in locs:
            del self.live[loc]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def double_free_changes_nothing(self, data):
        loc = data.draw(st.sampled_from(sorted(self.live)))
        before = self.a.stats()
        with pytest.raises(RramError):
            self.a.free(np.array([loc, loc], dtype=np.uint64))
        assert self.a.stats() == before

    @rule(k=st.integers(0, 50))
    def pick_victims(self, k):
        out = np.zeros(k, dtype=np.uint64)
        own = np.zeros(k, dtype=np.uint64)
        got = self.a.pick_victims(k, out, own)
        assert got == min(k, len(self.live))
        assert len(set(out[:got].tolist())) == got
        for loc, owner in zip(out[:got].tolist(), own[:got].tolist()):
            assert self.live[loc][1] == owner

    @invariant()
    def slots_never_overlap_and_stay_inside_their_slab(self):
        spans = sorted(
            (L.loc_slab(loc), L.loc_offset(loc), L.loc_offset(loc) + slot_bytes(size))
            for loc, (size, _) in self.live.items()
        )
        for (s1, _, end1), (s2, start2, _) in zip(spans, spans[1:]):
            assert s1 != s2 or end1 <= start2
        for slab_id, start, end in spans:
            assert end <= self.slabs[slab_id] and start // BLOCK == (end - 1) // BLOCK

    @invariant()
    def accounting_is_exact(self):
        s = self.a.stats()
        assert s["slots_used"] == len(self.live)
        assert s["bytes_stored"] == sum(size for size, _ in self.live.values())
        used = {slab_id: 0 for slab_id in self.slabs}
        for loc, (size, _) in self.live.items():
            used[L.loc_slab(loc)] += slot_bytes(size)
        active = [i for i in self.slabs if i not in self.retired]
        assert self.a.capacity_bytes == sum(self.slabs[i] for i in active)
        assert self.a.free_bytes == sum(self.slabs[i] - used[i] for i in active)
        assert s["slot_bytes"] == sum(used.values())
        assert all(self.a.slab_used_bytes(i) == used[i] for i in self.slabs)
        assert sorted(self.a.slab_ids()) == sorted(self.slabs)
        assert sorted(self.a.empty_slabs()) == sorted(i for i in self.slabs if used[i] == 0)
        assert s["blocks_used"] == sum(s["class_blocks"].values())
        assert s["bytes_in_blocks"] >= s["slot_bytes"]

    @invariant()
    def owners_are_recorded(self):
        if self.live:
            locs = np.array(sorted(self.live), dtype=np.uint64)
            out = np.zeros(len(locs), dtype=np.uint64)
            self.a.owners(locs, out)
            assert out.tolist() == [self.live[loc][1] for loc in locs.tolist()]


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
