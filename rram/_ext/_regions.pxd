# The region table, declared for the modules that check keys in C (_regions, _tcpwire).
# The key checks are inline here so that _tcpwire's per-op lookups stay plain C, not vtable calls.
from cpython.pythread cimport PyThread_type_lock, PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from ops cimport OP_READ, OP_WRITE, WC_REM_ACCESS_ERR, WC_REM_INV_REQ_ERR, WC_SUCCESS

cdef enum:
    SLOT_BITS = 13
    SLOT_COUNT = 1 << 13

cdef struct region_t:
    uint64_t base
    uint64_t length
    uint32_t key  # 0: free slot


cdef class RegionTable:
    cdef region_t *regions
    cdef uint32_t nslots
    cdef uint32_t *free_slots
    cdef uint32_t nfree
    cdef uint32_t live
    cdef PyThread_type_lock lock

    # every executor holds the lock while it copies, so once deregister returns no op reaches the region
    cdef inline void _lock(self) noexcept nogil:
        PyThread_acquire_lock(self.lock, WAIT_LOCK)

    cdef inline void _unlock(self) noexcept nogil:
        PyThread_release_lock(self.lock)

    cdef inline const region_t *_find(self, uint32_t key) noexcept nogil:
        cdef uint32_t slot = key & (SLOT_COUNT - 1)
        if key == 0 or slot >= self.nslots or self.regions[slot].key != key:
            return NULL
        return &self.regions[slot]

    cdef inline bint _inside(self, uint32_t key, uint64_t addr, uint64_t length) noexcept nogil:
        """The whole range [addr, addr+length) lies in the live region ``key``."""
        cdef const region_t *r = self._find(key)
        return (r != NULL and addr >= r.base and length <= r.length
                and addr - r.base <= r.length - length)

    cdef inline int _check_remote(self, uint8_t opcode, uint64_t addr, uint32_t length, uint32_t rkey,
                                  uint32_t max_len) noexcept nogil:
        """The provider's checks of one op on this table: WC_SUCCESS, or the status that fails it."""
        if (opcode != OP_READ and opcode != OP_WRITE) or length == 0 or length > max_len:
            return WC_REM_INV_REQ_ERR
        if not self._inside(rkey, addr, length):
            return WC_REM_ACCESS_ERR
        return WC_SUCCESS
