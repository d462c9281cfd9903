"""Page metadata, all in: bytes of requester memory a stored page costs; and slot allocation speed.

    .venv/bin/pytest bench/test_metadata_bench.py --benchmark-only -p no:cacheprovider

The figures are bytes, measured with glibc's mallinfo2 (bytes malloc has handed out, its own
headers and the hash tables' slack included) around the work, and they are the benchmarks'
timed values (bench/conftest.py ``figure``), median of 3 rounds, each from empty:

* **all in** (the figure of record; goal <= 16 B a stored page): a real PageStore on two tcp
  provider processes takes the demo's page mix through a 4 MiB local budget; the requester's
  heap growth while it stores the pages after the first WARM_PAGES, divided by the pages
  stored meanwhile (zero pages, which take no slot, are in the numerator and not in the
  denominator).  The first pages are left out because they also pay for buffers the store
  makes once, on first use (transport buffers, scratch arrays); ``extra_info`` has the average
  over the whole fill as well (``whole_fill_bytes_per_page``).  That is the page map, both slot
  allocators (owner keys, stored sizes, block headers and bitmaps, slab tables), the remote
  tier's per-slab tables, every C structure the store grows.  Sealed (the default) and plain:
  a sealed remote page adds its version, the remote slot's 8-byte owner word.  Not counted: Python objects
  (pymalloc's arenas are not malloc's), a few per slab, and page data (mmap'ed arenas).
* the parts, for the breakdown: the page map alone (4M dense keys, swap-like, and a sparse
  key set), and the slot allocator alone for the mix's compressed sizes, with owner keys (the
  local pool) and without (remote slabs).
* baseline: a Python dict of int key -> int location, by sys.getsizeof (page map only).

Allocator speed: alloc + free of 1024 mixed sizes, the compiled SlotAllocator against a
pure-Python size-class allocator (lists and a dict).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import numpy as np
import pytest

from figures import scaled
from rram.cluster import open_store
from rram.datapath import codec
from rram.datapath import keys as K
from rram.datapath import slab as L
from rram.datapath.pagemap import PageMap
from rram.testing.cluster import LocalCluster
from rram.testing.pages import make_pages, page_checksums

STORE_PAGES = scaled(131072, 8192)  # 512 MiB of the mix; ~0.5 GB compressed over 2 replicas
DENSE_PAGES = scaled(4 << 20, 1 << 16)
SPARSE_PAGES = scaled(1 << 20, 1 << 14)
SPARSE_SPAN = SPARSE_PAGES * 32  # one page in 32 indexes
ALLOC_SLOTS = scaled(1 << 20, 1 << 15)
SLAB = 64 << 20
BATCH = 1 << 16
DICT_PAGES = scaled(1 << 18, 1 << 14)
PUT_CHUNK = scaled(8192, 2048)
WARM_PAGES = 2 * PUT_CHUNK  # put before measuring
GROUP = "metadata, bytes a page (all in vs parts vs dict)"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int:
    """Bytes malloc has handed out (small + mmap'ed), over all arenas."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    try:
        fn = libc.mallinfo2
    except AttributeError:
        pytest.skip("glibc's mallinfo2 is not available (glibc < 2.33): heap bytes cannot be measured")
    fn.restype = _MallInfo2
    info = fn()
    return info.uordblks + info.hblkhd


# -- all in: a real store ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mix():
    pages = make_pages(STORE_PAGES, seed=12)
    return pages, page_checksums(pages, STORE_PAGES)


def _stored(store) -> int:
    s = store.stats()
    return s["local_pages"] + s["remote_pages"]


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "plain"])
def test_store_all_in_bytes_per_page(benchmark, figure, mix, seal):
    data, crcs = mix
    rounds = contextlib.ExitStack()
    held: dict = {}

    with LocalCluster(n_providers=2, capacity="1GiB", transport="tcp", slab_size="64MiB", verbose=False) as cluster:

        def fresh():
            rounds.close()  # the previous round's store goes first, its leases with it
            store = rounds.enter_context(open_store(cluster.config, name="meta", local_budget=4 << 20, keeper=False,
                                                       seal=seal))
            return (store, store.create_pool()), {}

        def fill(store, pool):
            start = _heap_in_use()
            for first in range(0, STORE_PAGES, PUT_CHUNK):
                if first == WARM_PAGES:  # buffers the store makes on first use are behind us
                    before, was = _heap_in_use(), _stored(store)
                n = min(PUT_CHUNK, STORE_PAGES - first)
                store.put_many(pool, 0, np.arange(first, first + n), data[first * 4096:(first + n) * 4096])
            end, s = _heap_in_use(), store.stats()
            held.update(pages=s["pages"], stored=_stored(store), local=s["local_pages"], remote=s["remote_pages"],
                        heap_bytes=end - start, pagemap_counted_bytes=s.get("metadata_bytes"),
                        whole_fill_bytes_per_page=round((end - start) / _stored(store), 2))
            return (end - before) / (_stored(store) - was)

        def verify(store, pool):  # every acknowledged put reads back
            out = np.empty(PUT_CHUNK * 4096, np.uint8)
            for first in range(0, STORE_PAGES, PUT_CHUNK):
                n = min(PUT_CHUNK, STORE_PAGES - first)
                assert store.get_many(pool, 0, np.arange(first, first + n), out[:n * 4096]).all()
                assert np.array_equal(page_checksums(out, n), crcs[first:first + n])

        try:
            median = figure(fill, unit="B/page", rounds=3, setup=fresh, teardown=verify)
        finally:
            rounds.close()
    assert held["remote"] > held["stored"] // 2, f"most pages should be remote: {held}"
    benchmark.extra_info.update(held, goal_bytes_per_page=16, goal_met=median <= 16)


# -- the parts --------------------------------------------------------------------------------


def _fill_map(pmap: PageMap, all_keys: np.ndarray) -> None:
    keys = np.empty(BATCH, np.uint64)
    locs = np.empty(BATCH, np.uint64)
    old = np.empty(BATCH, np.uint64)
    for start in range(0, len(all_keys), BATCH):
        n = min(BATCH, len(all_keys) - start)
        keys[:n] = all_keys[start:start + n]
        np.bitwise_or(np.left_shift(keys[:n], np.uint64(8)), np.uint64(L.KIND_STORED), out=locs[:n])
        pmap.store(keys[:n], locs[:n], old[:n])


def _pagemap_figure(benchmark, figure, all_keys: np.ndarray) -> None:
    holder: list = []

    def build():
        holder.clear()  # the previous round's map goes first
        before = _heap_in_use()
        pmap = PageMap()
        _fill_map(pmap, all_keys)
        holder.append(pmap)
        return (_heap_in_use() - before) / len(pmap)

    figure(build, unit="B/page", rounds=3)
    pmap = holder[0]
    assert len(pmap) == len(all_keys)
    benchmark.extra_info.update(pages=len(pmap), counted_by_map=round(pmap.metadata_bytes() / len(pmap), 3))


@pytest.mark.benchmark(group=GROUP)
def test_pagemap_dense_bytes_per_page(benchmark, figure):
    _pagemap_figure(benchmark, figure, K.pack_many(0, 1, np.arange(DENSE_PAGES)))


@pytest.mark.benchmark(group=GROUP)
def test_pagemap_sparse_bytes_per_page(benchmark, figure):
    rng = np.random.default_rng(3)
    idx = np.sort(rng.choice(SPARSE_SPAN, SPARSE_PAGES, replace=False))
    _pagemap_figure(benchmark, figure, K.pack_many(2, 7, idx))


@pytest.fixture(scope="module")
def mix_sizes():
    """Stored sizes of the mix's non-zero pages, as the store keeps them (raw above 3584 B)."""
    n = min(ALLOC_SLOTS, 16384)
    pages = make_pages(n, seed=13, mix={"text": 0.35, "binary": 0.35, "random": 0.15})
    images, sizes = np.empty_like(pages), np.zeros(n, np.uint32)
    codec.compress_pages(pages, n, images, sizes)
    sizes[sizes > 3584] = 4096
    return np.resize(sizes, ALLOC_SLOTS)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("owners", [True, False], ids=["local-pool-with-owners", "remote-slabs"])
def test_allocator_bytes_per_slot(benchmark, figure, mix_sizes, owners):
    n = len(mix_sizes)
    locs = np.zeros(n, np.uint64)
    keys = np.arange(1, n + 1, dtype=np.uint64)
    holder: list = []

    def fill():
        holder.clear()
        before = _heap_in_use()
        a = L.SlotAllocator(track_owners=owners)
        slabs = int(mix_sizes.sum()) // SLAB + 2
        for s in range(slabs):
            a.add_slab(4096 + s, SLAB)
        assert a.alloc(mix_sizes, locs, keys if owners else None, n) == n
        holder.append(a)
        return (_heap_in_use() - before) / n

    figure(fill, unit="B/page", rounds=3)
    benchmark.extra_info.update(slots=n, mean_stored_size=round(float(mix_sizes.mean()), 1))


@pytest.mark.benchmark(group=GROUP)
def test_dict_baseline_bytes_per_page(benchmark, figure):
    """What one Python dict entry a page costs (int key -> int location)."""
    keys = K.pack_many(0, 1, np.arange(DICT_PAGES)).tolist()
    holder: list = []

    def build():
        holder.clear()
        d = {k: (k << 8) | 2 for k in keys}
        holder.append(d)
        return (sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())) / len(d)

    figure(build, unit="B/page", rounds=3)
    benchmark.extra_info["pages"] = DICT_PAGES


# -- allocator speed ------------------------------------------------------------------------------


class PySlotAllocator:
    """The same policy in plain Python: per-class stacks of free slots, a bump pointer over blocks."""

    def __init__(self, slab_id: int, size: int):
        self.slab_id = slab_id
        self.blocks = size // L.BLOCK_SIZE
        self.next_block = 0
        self.free_slots: dict[int, list[int]] = {}
        self.owners: dict[int, int] = {}

    def alloc(self, sizes, owners) -> list[int]:
        out = []
        for size, owner in zip(sizes, owners):
            cls = (size + 63) >> 6
            stack = self.free_slots.setdefault(cls, [])
            if not stack:
                if self.next_block == self.blocks:
                    break
                base = self.next_block * L.BLOCK_SIZE
                self.next_block += 1
                step = cls * 64
                stack.extend(range(base + (L.BLOCK_SIZE // step - 1) * step, base - 1, -step))
            off = stack.pop()
            loc = (self.slab_id << L.SLAB_SHIFT) | ((off >> 6) << L.OFFSET_SHIFT) | (size << L.SIZE_SHIFT) | 2
            self.owners[loc] = owner
            out.append(loc)
        return out

    def free(self, locs) -> None:
        for loc in locs:
            del self.owners[loc]
            size = (loc >> L.SIZE_SHIFT) & L.SIZE_FIELD
            self.free_slots[(size + 63) >> 6].append(((loc >> L.OFFSET_SHIFT) & L.OFFSET_FIELD) << 6)


@pytest.fixture(scope="module")
def mixed_sizes():
    """1024 sizes like a compressed page mix: many small, a hump around 1-2 KiB, some raw."""
    rng = np.random.default_rng(11)
    sizes = np.concatenate([rng.integers(40, 400, 300), rng.integers(800, 2600, 600), np.full(124, 4096)])
    rng.shuffle(sizes)
    return sizes.astype(np.uint32)


@pytest.mark.parametrize("impl", ["native", "python"])
def test_alloc_free_1024_mixed(benchmark, impl, mixed_sizes):
    benchmark.group = "allocator alloc+free (1024 mixed sizes)"
    n = len(mixed_sizes)
    owners = np.arange(1, n + 1, dtype=np.uint64)
    if impl == "native":
        a = L.SlotAllocator(track_owners=True)
        a.add_slab(1, 64 << 20)
        locs = np.zeros(n, np.uint64)

        def cycle():
            assert a.alloc(mixed_sizes, locs, owners, n) == n
            a.free(locs, n)
    else:
        a = PySlotAllocator(1, 64 << 20)
        sizes, keys = mixed_sizes.tolist(), owners.tolist()

        def cycle():
            got = a.alloc(sizes, keys)
            assert len(got) == n
            a.free(got)

    benchmark.pedantic(cycle, rounds=scaled(200, 5), iterations=5, warmup_rounds=5)
    benchmark.extra_info["ns_per_page"] = round(benchmark.stats.stats.mean / n * 1e9, 1)
