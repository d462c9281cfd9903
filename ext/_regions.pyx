# cython: language_level=3
"""Registered memory regions and the in-process copies over them, GIL released around the C work.

* ``RegionTable``: registered (base, length) regions looked up by key in O(1), used by the tcp
  transport (both sides, see _tcpwire) and the loopback transport.  A key is
  ``generation << SLOT_BITS | slot`` with a process-wide generation counter, so a key
  matches only the registration that issued it: never another table's region, never a
  region registered later in the same slot (until the counter wraps after 2**19
  registrations).  Each table has a lock that every executor holds while it copies, so
  once ``deregister`` returns no operation can reach the region.
* ``execute_direct``: the loopback transport's executor (local and remote addresses in one
  process), returning ``(status, index, read_bytes, written_bytes)``; ``status`` is an
  ``ibv_wc_status`` (0 = every op done).
* ``copy_batch``: n raw memcpy's (the baseline the transport benchmarks compare against).
"""
from cpython.pythread cimport PyThread_allocate_lock, PyThread_free_lock
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from ops cimport OP_WRITE, WC_LOC_PROT_ERR, WC_SUCCESS, op_t

MAX_SLOTS = SLOT_COUNT

cdef uint32_t _generation = 0

assert sizeof(op_t) == 32


def copy_batch(const uint64_t[:] dst_addrs, const uint64_t[:] src_addrs, const uint32_t[:] lengths, Py_ssize_t n):
    """memcpy(dst_addrs[i], src_addrs[i], lengths[i]) for i < n; the caller owns the memory."""
    if n < 0 or n > dst_addrs.shape[0] or n > src_addrs.shape[0] or n > lengths.shape[0]:
        raise ValueError(f"n={n} exceeds the arrays ({dst_addrs.shape[0]}, {src_addrs.shape[0]}, {lengths.shape[0]})")
    cdef Py_ssize_t i
    with nogil:
        for i in range(n):
            memcpy(<void *>dst_addrs[i], <const void *>src_addrs[i], lengths[i])


cdef class RegionTable:
    """Registered memory regions of one session (provider) or one endpoint (requester)."""

    def __cinit__(self):
        self.regions = <region_t *>malloc(SLOT_COUNT * sizeof(region_t))
        self.free_slots = <uint32_t *>malloc(SLOT_COUNT * sizeof(uint32_t))
        self.lock = PyThread_allocate_lock()
        if self.regions == NULL or self.free_slots == NULL or self.lock == NULL:
            raise MemoryError("cannot allocate a region table")
        self.nslots = 0
        self.nfree = 0
        self.live = 0

    def __dealloc__(self):
        free(self.regions)
        free(self.free_slots)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    def register(self, uint64_t addr, uint64_t length):
        """Add (addr, length); returns its key (never 0)."""
        global _generation
        if length == 0 or addr == 0 or addr + length < addr:
            raise ValueError(f"cannot register {length} bytes at {addr:#x}")
        cdef uint32_t slot, key
        with nogil:
            self._lock()
        try:
            if self.nfree:
                self.nfree -= 1
                slot = self.free_slots[self.nfree]
            elif self.nslots < SLOT_COUNT:
                slot = self.nslots
                self.nslots += 1
            else:
                raise OverflowError(f"a table holds at most {MAX_SLOTS} regions")
            _generation = (_generation + 1) & ((1u << (32 - SLOT_BITS)) - 1)
            if _generation == 0:
                _generation = 1
            key = (_generation << SLOT_BITS) | slot
            self.regions[slot].base = addr
            self.regions[slot].length = length
            self.regions[slot].key = key
            self.live += 1
        finally:
            self._unlock()
        return key

    def deregister(self, uint32_t key):
        """Remove the region; waits for batches in progress. Returns False for an unknown key."""
        cdef uint32_t slot = key & (SLOT_COUNT - 1)
        cdef bint found = False
        with nogil:
            self._lock()
            if key != 0 and slot < self.nslots and self.regions[slot].key == key:
                self.regions[slot].key = 0
                self.free_slots[self.nfree] = slot
                self.nfree += 1
                self.live -= 1
                found = True
            self._unlock()
        return found

    def clear(self):
        """Deregister every region."""
        cdef uint32_t i
        with nogil:
            self._lock()
            for i in range(self.nslots):
                self.regions[i].key = 0
            self.nslots = 0
            self.nfree = 0
            self.live = 0
            self._unlock()

    def lookup(self, uint32_t key):
        """(base, length) of a live key, or None."""
        cdef const region_t *r = self._find(key)
        return None if r == NULL else (r.base, r.length)

    def __len__(self):
        return self.live


cdef inline const op_t *_ops_ptr(const uint8_t[::1] ops, Py_ssize_t n) except NULL:
    if n <= 0 or <size_t>n * sizeof(op_t) > <size_t>ops.shape[0]:
        raise ValueError(f"{n} operations do not fit in {ops.shape[0]} bytes of OP_DTYPE")
    return <const op_t *>&ops[0]


def execute_direct(RegionTable remote, RegionTable local, const uint8_t[::1] ops, Py_ssize_t n, uint32_t max_len):
    """Carry out ``n`` OP_DTYPE operations in one process (loopback): lkey, then rkey checks."""
    cdef const op_t *o = _ops_ptr(ops, n)
    cdef Py_ssize_t i
    cdef int status = WC_SUCCESS
    cdef uint64_t rbytes = 0, wbytes = 0
    with nogil:
        remote._lock()
        local._lock()
        for i in range(n):
            if not local._inside(o[i].lkey, o[i].local_addr, o[i].length):
                status = WC_LOC_PROT_ERR
                break
            status = remote._check_remote(o[i].opcode, o[i].remote_addr, o[i].length, o[i].rkey, max_len)
            if status != WC_SUCCESS:
                break
            if o[i].opcode == OP_WRITE:
                memcpy(<void *>o[i].remote_addr, <const void *>o[i].local_addr, o[i].length)
                wbytes += o[i].length
            else:
                memcpy(<void *>o[i].local_addr, <const void *>o[i].remote_addr, o[i].length)
                rbytes += o[i].length
        local._unlock()
        remote._unlock()
    return status, (i if status != WC_SUCCESS else n), rbytes, wbytes
