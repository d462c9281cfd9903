# cython: language_level=3
"""Batched copies for the tcp and loopback transports, GIL released around the C work.

* ``copy_batch``: n raw memcpy's (the page store's local copies).
* ``RegionTable``: registered (base, length) regions looked up by key in O(1).  A key is
  ``generation << SLOT_BITS | slot`` with a process-wide generation counter, so a key
  matches only the registration that issued it: never another table's region, never a
  region registered later in the same slot (until the counter wraps after 2**19
  registrations).  Each table has a lock that every executor holds while it copies, so
  once ``deregister`` returns no operation can reach the region.
* ``execute_wire``: the tcp provider's executor (wire descriptors + WRITE payload in,
  READ data out).  ``execute_direct``: loopback (local and remote addresses in one process).
* ``gather`` / ``scatter``: the tcp requester's side, with the local-key (lkey) check.

Executors return ``(status, index, read_bytes, written_bytes)``: ``status`` is an
``ibv_wc_status`` (0 = every op done) or a negative ``MALFORMED_*`` code meaning the batch
itself is inconsistent (framing broken; nothing was executed).
"""
from cpython.pythread cimport (
    PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
    PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK,
)
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy

cdef enum:
    SLOT_BITS = 13
    SLOT_COUNT = 1 << 13
    OP_READ = 0
    OP_WRITE = 1
    WC_SUCCESS = 0
    WC_LOC_PROT_ERR = 4
    WC_REM_INV_REQ_ERR = 9
    WC_REM_ACCESS_ERR = 10

MAX_SLOTS = SLOT_COUNT
#: write payload size differs from the sum of the WRITE lengths
MALFORMED_PAYLOAD = -1
#: the output buffer is too small; ``index`` holds the bytes needed
MALFORMED_SHORT_OUTPUT = -2
#: READ data of the batch exceeds the caller's limit
MALFORMED_READ_LIMIT = -3

# mirrors OP_DTYPE in rram/transport/base.py (32 bytes)
cdef packed struct op_t:
    uint64_t local_addr
    uint64_t remote_addr
    uint32_t length
    uint32_t lkey
    uint32_t rkey
    uint8_t opcode
    uint8_t pad[3]

# mirrors WIRE_OP in rram/transport/wire.py (24 bytes)
cdef packed struct wire_op_t:
    uint64_t remote_addr
    uint32_t length
    uint32_t rkey
    uint8_t opcode
    uint8_t reserved[7]

cdef struct region_t:
    uint64_t base
    uint64_t length
    uint32_t key  # 0: free slot

cdef uint32_t _generation = 0

assert sizeof(op_t) == 32 and sizeof(wire_op_t) == 24


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

    cdef region_t *regions
    cdef uint32_t nslots
    cdef uint32_t *free_slots
    cdef uint32_t nfree
    cdef uint32_t live
    cdef PyThread_type_lock lock

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

    cdef inline void _lock(self) noexcept nogil:
        PyThread_acquire_lock(self.lock, WAIT_LOCK)

    cdef inline void _unlock(self) noexcept nogil:
        PyThread_release_lock(self.lock)

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


cdef inline const op_t *_ops_ptr(const uint8_t[::1] ops, Py_ssize_t n) except NULL:
    if n <= 0 or <size_t>n * sizeof(op_t) > <size_t>ops.shape[0]:
        raise ValueError(f"{n} operations do not fit in {ops.shape[0]} bytes of OP_DTYPE")
    return <const op_t *>&ops[0]


def execute_wire(RegionTable table, const uint8_t[::1] descs, Py_ssize_t n, const uint8_t[::1] payload,
                 uint8_t[::1] out, Py_ssize_t out_offset, uint32_t max_len):
    """Carry out ``n`` wire descriptors in order against ``table`` (the tcp provider's side).

    WRITE data is taken from ``payload`` in op order; READ data goes to ``out[out_offset:]``
    in op order.  Stops at the first failing op.
    """
    if n <= 0 or <size_t>n * sizeof(wire_op_t) > <size_t>descs.shape[0]:
        raise ValueError(f"{n} descriptors do not fit in {descs.shape[0]} bytes")
    if out_offset < 0 or out_offset > out.shape[0]:
        raise ValueError("out_offset outside the output buffer")
    cdef const wire_op_t *d = <const wire_op_t *>&descs[0]
    cdef const uint8_t *src = &payload[0] if payload.shape[0] else NULL
    cdef uint8_t *dst = &out[out_offset] if out.shape[0] > out_offset else NULL
    cdef uint64_t wtotal = 0, rtotal = 0, woff = 0, roff = 0
    cdef uint64_t room = out.shape[0] - out_offset
    cdef Py_ssize_t i
    cdef int status = WC_SUCCESS

    # the descriptors must account for the payload exactly, and the READ data must fit
    for i in range(n):
        if d[i].opcode == OP_WRITE:
            wtotal += d[i].length
        elif d[i].opcode == OP_READ:
            rtotal += d[i].length
    if wtotal != <uint64_t>payload.shape[0]:
        return MALFORMED_PAYLOAD, 0, 0, 0
    if rtotal > room:
        return MALFORMED_SHORT_OUTPUT, rtotal, 0, 0
    with nogil:
        status = _run_wire(table, d, n, src, dst, max_len, &i, &roff, &woff)
    return status, i, roff, woff


cdef int _run_wire(RegionTable table, const wire_op_t *d, Py_ssize_t n, const uint8_t *src, uint8_t *dst,
                   uint32_t max_len, Py_ssize_t *done, uint64_t *rbytes, uint64_t *wbytes) noexcept nogil:
    """Execute n wire ops in order under the table lock; ``done`` = index of the failing op, or n."""
    cdef Py_ssize_t i
    cdef int status = WC_SUCCESS
    cdef uint64_t woff = 0, roff = 0
    table._lock()
    for i in range(n):
        if (d[i].opcode != OP_READ and d[i].opcode != OP_WRITE) or d[i].length == 0 or d[i].length > max_len:
            status = WC_REM_INV_REQ_ERR
            break
        if not table._inside(d[i].rkey, d[i].remote_addr, d[i].length):
            status = WC_REM_ACCESS_ERR
            break
        if d[i].opcode == OP_WRITE:
            memcpy(<void *>d[i].remote_addr, src + woff, d[i].length)
            woff += d[i].length
        else:
            memcpy(dst + roff, <const void *>d[i].remote_addr, d[i].length)
            roff += d[i].length
    table._unlock()
    done[0] = i if status != WC_SUCCESS else n
    rbytes[0] = roff
    wbytes[0] = woff
    return status


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
            if (o[i].opcode != OP_READ and o[i].opcode != OP_WRITE) or o[i].length == 0 or o[i].length > max_len:
                status = WC_REM_INV_REQ_ERR
                break
            if not remote._inside(o[i].rkey, o[i].remote_addr, o[i].length):
                status = WC_REM_ACCESS_ERR
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


def measure(const uint8_t[::1] ops, Py_ssize_t n):
    """(write_bytes, read_bytes) of n OP_DTYPE operations."""
    cdef const op_t *o = _ops_ptr(ops, n)
    cdef uint64_t w = 0, r = 0
    cdef Py_ssize_t i
    for i in range(n):
        if o[i].opcode == OP_WRITE:
            w += o[i].length
        elif o[i].opcode == OP_READ:
            r += o[i].length
    return w, r


def gather(RegionTable local, const uint8_t[::1] ops, Py_ssize_t n, uint8_t[::1] buf, Py_ssize_t offset):
    """Encode ops into ``buf[offset:]``: n wire descriptors, then the WRITE payload gathered
    from local memory.  Stops before the first op whose local buffer is outside its lkey
    region.  Returns (ops_encoded, bytes_written); the caller sized ``buf`` with ``measure``."""
    cdef const op_t *o = _ops_ptr(ops, n)
    cdef Py_ssize_t i, k = n
    cdef uint64_t need = 0
    cdef wire_op_t *d
    cdef uint8_t *p
    if offset < 0 or offset > buf.shape[0]:
        raise ValueError("offset outside the buffer")
    with nogil:
        local._lock()
        for i in range(n):
            if not local._inside(o[i].lkey, o[i].local_addr, o[i].length):
                k = i
                break
            need += sizeof(wire_op_t) + (o[i].length if o[i].opcode == OP_WRITE else 0)
        if need <= <uint64_t>(buf.shape[0] - offset):
            d = <wire_op_t *>&buf[offset]
            p = <uint8_t *>&buf[offset] + k * sizeof(wire_op_t)
            for i in range(k):
                d[i].remote_addr = o[i].remote_addr
                d[i].length = o[i].length
                d[i].rkey = o[i].rkey
                d[i].opcode = o[i].opcode
                d[i].reserved[0] = 0; d[i].reserved[1] = 0; d[i].reserved[2] = 0; d[i].reserved[3] = 0
                d[i].reserved[4] = 0; d[i].reserved[5] = 0; d[i].reserved[6] = 0
                if o[i].opcode == OP_WRITE:
                    memcpy(p, <const void *>o[i].local_addr, o[i].length)
                    p += o[i].length
        local._unlock()
    if need > <uint64_t>(buf.shape[0] - offset):
        raise ValueError(f"send buffer too small: need {need} bytes after offset {offset}")
    return k, need


def scatter(RegionTable local, const uint8_t[::1] ops, Py_ssize_t n, const uint8_t[::1] data):
    """Copy READ data (concatenated in op order) to the local buffers of ops[:n].

    Returns (status, index): WC_SUCCESS, WC_LOC_PROT_ERR at the op whose local region went
    away, or MALFORMED_PAYLOAD when ``data`` does not match the READ lengths exactly.
    """
    if n == 0:
        return (WC_SUCCESS, 0) if data.shape[0] == 0 else (MALFORMED_PAYLOAD, 0)
    cdef const op_t *o = _ops_ptr(ops, n)
    cdef const uint8_t *src = &data[0] if data.shape[0] else NULL
    cdef uint64_t total = 0, off = 0
    cdef Py_ssize_t i
    cdef int status = WC_SUCCESS
    for i in range(n):
        if o[i].opcode == OP_READ:
            total += o[i].length
    if total != <uint64_t>data.shape[0]:
        return MALFORMED_PAYLOAD, 0
    with nogil:
        local._lock()
        for i in range(n):
            if o[i].opcode != OP_READ:
                continue
            if not local._inside(o[i].lkey, o[i].local_addr, o[i].length):
                status = WC_LOC_PROT_ERR
                break
            memcpy(<void *>o[i].local_addr, src + off, o[i].length)
            off += o[i].length
        local._unlock()
    return status, (i if status != WC_SUCCESS else n)
