"""Memory at a fixed address, so that the seed corpus can name real remote addresses and keys.

The tcp targets register one region, first thing in their process: its key is then always the
first key a RegionTable hands out, and its address is ``REGION``.  Guard bytes on both sides
(zero, never registered) catch a copy that strays outside the region.
"""
from __future__ import annotations

import ctypes
import mmap

import numpy as np

#: the first key a process's RegionTable hands out: generation 1, slot 0 (ext/_regions.pyx)
FIRST_KEY = 1 << 13
REGION = 0x2000_0000_0000  # 32 TiB: free in a fresh x86-64 process
REGION_SIZE = 4096
GUARD = 4096
#: a second fixed region for the requester's local buffers
LOCAL = 0x2100_0000_0000

_MAP_FIXED_NOREPLACE = 0x100000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)


def mapping(addr: int, size: int) -> np.ndarray:
    """``size`` zeroed bytes at exactly ``addr``, with a guard of GUARD bytes before and after;
    returns the whole mapping (guards included) as a uint8 array."""
    start, total = addr - GUARD, size + 2 * GUARD
    got = _libc.mmap(start, total, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE, -1, 0)
    if got != start:
        raise OSError(ctypes.get_errno(), f"cannot map {total} bytes at {start:#x} (got {got})")
    return np.ctypeslib.as_array((ctypes.c_uint8 * total).from_address(start))


def guards_intact(mem: np.ndarray) -> bool:
    return not mem[:GUARD].any() and not mem[-GUARD:].any()
