"""Page metadata: bytes a page in the page map, and slot allocation speed.

* Page map size: 4M dense pages (swap-like) and a sparse variant, in ``extra_info`` as
  bytes/page, counted by the map and measured with glibc's mallinfo2 (malloc headers and hash
  table slack included).  Baseline in the same run: a Python dict of the same kind of keys.
  The dense figure is asserted (<= 16 bytes a page): it is a size, not a timing.
* Allocator: alloc + free of 1024 mixed sizes, the compiled SlotAllocator against a pure-Python
  size-class allocator (lists and a dict).

    .venv/bin/pytest bench/test_metadata_bench.py --benchmark-columns=mean,stddev,rounds
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import numpy as np
import pytest

from rram.datapath import keys as K
from rram.datapath import slab as L
from rram.datapath.pagemap import PageMap

DENSE_PAGES = 4 << 20
SPARSE_PAGES = 1 << 20
SPARSE_SPAN = 1 << 25  # one page in 32 indexes
BATCH = 1 << 16
DICT_PAGES = 1 << 18


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    """Bytes malloc has handed out (small + mmap'ed), or None without glibc's mallinfo2."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        fn = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return info.uordblks + info.hblkhd


def _fill(pmap: PageMap, all_keys: np.ndarray) -> None:
    keys = np.empty(BATCH, np.uint64)
    locs = np.empty(BATCH, np.uint64)
    old = np.empty(BATCH, np.uint64)
    for start in range(0, len(all_keys), BATCH):
        n = min(BATCH, len(all_keys) - start)
        keys[:n] = all_keys[start:start + n]
        np.bitwise_or(np.left_shift(keys[:n], np.uint64(8)), np.uint64(L.KIND_STORED), out=locs[:n])
        pmap.store(keys[:n], locs[:n], old[:n])


def _measure(benchmark, all_keys: np.ndarray) -> tuple[float, float | None]:
    holder = []

    def build():
        holder.clear()  # the previous round's map goes first
        before = _heap_in_use()
        pmap = PageMap()
        _fill(pmap, all_keys)
        after = _heap_in_use()
        holder.append((pmap, before, after))

    benchmark.pedantic(build, rounds=1, iterations=1)
    pmap, before, after = holder[0]
    assert len(pmap) == len(all_keys)
    counted = pmap.metadata_bytes() / len(pmap)
    measured = None if before is None else (after - before) / len(pmap)
    benchmark.extra_info["pages"] = len(pmap)
    benchmark.extra_info["bytes_per_page_counted"] = round(counted, 3)
    if measured is not None:
        benchmark.extra_info["bytes_per_page_malloc"] = round(measured, 3)
    return counted, measured


def test_pagemap_dense_bytes_per_page(benchmark):
    benchmark.group = "page map metadata"
    all_keys = K.pack_many(0, 1, np.arange(DENSE_PAGES))
    counted, measured = _measure(benchmark, all_keys)
    assert counted <= 16
    if measured is not None:
        assert measured <= 16


def test_pagemap_sparse_bytes_per_page(benchmark):
    benchmark.group = "page map metadata"
    rng = np.random.default_rng(3)
    idx = np.sort(rng.choice(SPARSE_SPAN, SPARSE_PAGES, replace=False))
    _measure(benchmark, K.pack_many(2, 7, idx))


def test_dict_baseline_bytes_per_page(benchmark):
    """What one Python dict entry a page costs (int key -> int location)."""
    benchmark.group = "page map metadata"
    keys = K.pack_many(0, 1, np.arange(DICT_PAGES)).tolist()
    holder = []

    def build():
        holder.clear()
        d = {k: (k << 8) | 2 for k in keys}
        holder.append(d)

    benchmark.pedantic(build, rounds=1, iterations=1)
    d = holder[0]
    per_page = (sys.getsizeof(d) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in d.items())) / len(d)
    benchmark.extra_info["pages"] = len(d)
    benchmark.extra_info["bytes_per_page_counted"] = round(per_page, 3)


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

    benchmark.pedantic(cycle, rounds=200, iterations=5, warmup_rounds=5)
    benchmark.extra_info["ns_per_page"] = round(benchmark.stats.stats.mean / n * 1e9, 1)
