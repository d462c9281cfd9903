"""The provider's memory: leased slabs under a hard capacity limit.

Every lease is its own anonymous mapping (rram.memory.Arena), so freeing a lease returns its
pages to the kernel at once and a region can be registered and deregistered on its own.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from .. import errors
from ..memory import Arena
from ..units import PAGE_SIZE


@dataclass
class Slab:
    lease_id: int
    arena: Arena
    rkey: int = 0

    @property
    def length(self) -> int:
        return self.arena.length


class SlabPool:
    """Hands out slabs while ``used + size <= capacity``; thread-safe."""

    def __init__(self, capacity: int, *, mlock: bool = False, hugepages: str = "off"):
        self.capacity = capacity
        self.mlock = mlock
        self.hugepages = hugepages
        self.used = 0
        self.count = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def allocate(self, size: int) -> Slab:
        """A new slab of ``size`` bytes; CapacityError when it would exceed the capacity."""
        if size <= 0 or size % PAGE_SIZE:
            raise errors.ProtocolError(f"slab size must be a positive multiple of {PAGE_SIZE}, got {size}")
        with self._lock:
            if self.used + size > self.capacity:
                raise errors.CapacityError(
                    f"capacity exceeded: cannot lease {size} bytes, {self.used} of {self.capacity} already leased")
            self.used += size  # reserve before mapping, so concurrent requests cannot overshoot
            lease_id = next(self._ids)
        try:
            arena = Arena(size, mlock=self.mlock, hugepages=self.hugepages)
        except BaseException:
            with self._lock:
                self.used -= size
            raise
        with self._lock:
            self.count += 1
        return Slab(lease_id, arena)

    def release(self, slab: Slab) -> None:
        """Unmap ``slab`` (deregister it from its transport session first)."""
        size = slab.length
        slab.arena.close()
        with self._lock:
            self.used -= size
            self.count -= 1
