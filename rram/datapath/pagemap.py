"""The page map: page key (uint64, rram.datapath.keys) -> page location (uint64, rram.datapath.slab).

``PageMap`` is the compiled map (ext/_pagemap.pyx): dense chunks of 512 locations, about 8
bytes a page.  It is not thread-safe; the page store serialises calls with its lock.
"""
from __future__ import annotations

import numpy as np

from .._ext._pagemap import PageMap  # noqa: F401  (re-exported)

__all__ = ["PageMap", "object_range", "pool_range", "items"]

_OBJ_SPAN = 1 << 32
_POOL_SPAN = 1 << 56


def object_range(pool: int, obj: int) -> tuple[int, int]:
    """[lo, hi) key range of one object, for ``PageMap.remove_range``."""
    lo = (pool << 56) | (obj << 32)
    return lo, lo + _OBJ_SPAN


def pool_range(pool: int) -> tuple[int, int]:
    """[lo, hi) key range of one pool (hi is 2**64 for pool 255; remove_range accepts that)."""
    lo = pool << 56
    return lo, lo + _POOL_SPAN


def items(pmap: PageMap) -> tuple[np.ndarray, np.ndarray]:
    """Every (key, location) of the map, in key order (a full scan, for tests and tools)."""
    return pmap.select(0, 0)
