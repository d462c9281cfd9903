"""Anonymous memory arenas with a stable address: provider slabs, local pools, staging buffers."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os

import numpy as np

from . import errors

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

HUGEPAGE_CHOICES = ("off", "transparent", "explicit")


class Arena:
    """``length`` bytes of anonymous memory at a fixed address.

    ``mlock`` pins it (a provider's slabs must not be swapped out: that would defeat the
    point); ``hugepages`` is "transparent" (madvise) or "explicit" (MAP_HUGETLB, needs
    reserved huge pages).  ``array`` is a uint8 numpy view; ``addr`` the start address.
    """

    def __init__(self, length: int, *, mlock: bool = False, hugepages: str = "off", populate: bool = False):
        if length <= 0:
            raise ValueError(f"arena length must be positive, got {length}")
        if hugepages not in HUGEPAGE_CHOICES:
            raise errors.ConfigError(f"hugepages must be one of {HUGEPAGE_CHOICES}, got {hugepages!r}")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= mmap.MAP_POPULATE
        if hugepages == "explicit":
            flags |= 0x40000  # MAP_HUGETLB
        try:
            self._mm = mmap.mmap(-1, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise errors.CapacityError(f"cannot map {length} bytes ({hugepages} hugepages): {exc}") from exc
        if hugepages == "transparent":
            try:
                self._mm.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, AttributeError) as exc:  # THP disabled: not fatal
                log.info("transparent hugepages not available: %s", exc)
        self.length = length
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        self.addr = int(self.array.ctypes.data)
        self.locked = False
        if mlock:
            if _libc.mlock(self.addr, length) != 0:
                err = ctypes.get_errno()
                self.close()
                raise errors.CapacityError(
                    f"mlock of {length} bytes failed: {os.strerror(err)} (raise `ulimit -l` or run as root)"
                )
            self.locked = True

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        if self._mm is None:
            return
        if self.locked:
            _libc.munlock(self.addr, self.length)
        self.array = None
        mm, self._mm = self._mm, None
        try:
            mm.close()
        except BufferError:
            # someone still holds a view: the mapping goes when the last view does
            log.debug("arena at %#x still exported; unmapped when released", self.addr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
