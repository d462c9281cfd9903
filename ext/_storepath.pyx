# cython: language_level=3
"""The page store's per-batch planning in C (module ``rram._ext._storepath``).

A get or put of a few pages used to cost a dozen numpy calls on tiny arrays (each a
microsecond or more) to classify locations, pick replicas and fill operation arrays.  Here
each of those steps is one C call over the batch, with no Python object per page:

* ``pack_keys``: page keys for an index array;
* ``Router``: remote locations -> operations written straight into each link's op array
  (READ from the first ready replica on a live link; WRITE to every live replica);
* ``StorePath``: a get batch's classification (absent / zero / local / remote) and decompress
  sources, a put batch's zero/non-zero split, local slot addresses, and the local/remote
  split of freed locations.

Hot paths in C, policy in Python: these functions only handle the common case.  Anything
unusual (a page without a ready replica on a live link, more pages for a link than its
``max_batch``, a key out of range...) makes them answer None or -1, and the failover path
(rram/datapath/failover.py) runs instead with all its failure handling.  The location layout is
ext/location.pxd.
"""
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from location cimport (
    KIND_ABSENT, KIND_MASK, KIND_STORED, location_layout, loc_offset, loc_size, loc_slab,
)
from ops cimport OP_READ, OP_WRITE, op_t

cdef enum:
    PAGE = 4096

#: the layout this module was built with (rram/datapath/slab.py checks it against _slab's)
LAYOUT = location_layout()

assert sizeof(op_t) == 32


cdef void *_data(object arr, Py_ssize_t itemsize, Py_ssize_t count, bint writable, str what) except NULL:
    """Address of a C-contiguous buffer of at least ``count`` items of ``itemsize`` bytes.

    For arrays the caller keeps alive (the pointer outlives the buffer request).
    """
    cdef Py_buffer b
    cdef void *p
    PyObject_GetBuffer(arr, &b, PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0))
    try:
        if b.itemsize != itemsize or b.len < count * itemsize:
            raise ValueError(f"{what}: need {count} items of {itemsize} bytes, got {b.len} bytes "
                             f"of {b.itemsize}-byte items")
        p = b.buf
    finally:
        PyBuffer_Release(&b)
    return p


# -- keys -------------------------------------------------------------------------------------


def pack_keys(pool, obj, indexes):
    """uint64 keys of ``indexes`` (a 1-D contiguous integer array) of one object, or None.

    None when the input is anything else (a list, a float array, numpy ids...) or an id or
    index is out of range: rram.datapath.keys.pack_many then does the job and words the error.
    """
    cdef Py_buffer b
    cdef Py_ssize_t n
    cdef uint64_t base
    cdef bint bad = False
    cdef char code
    if type(pool) is not int or type(obj) is not int or not (0 <= pool < 256 and 0 <= obj < (1 << 24)):
        return None
    try:
        PyObject_GetBuffer(indexes, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except (BufferError, TypeError, ValueError):
        return None
    try:
        if b.ndim != 1 or b.format == NULL or b.format[0] == 0 or b.format[1] != 0:
            return None
        code = b.format[0]
        n = b.shape[0]
        out = np.empty(n, dtype=np.uint64)
        if n == 0:
            return out
        base = (pool << 56) | (obj << 32)
        if not _pack(code, b.itemsize, b.buf, n, base, _data(out, 8, n, True, "keys"), &bad):
            return None
    finally:
        PyBuffer_Release(&b)
    return None if bad else out


cdef bint _pack(char code, Py_ssize_t size, const void *src, Py_ssize_t n, uint64_t base, void *dst,
                bint *bad) noexcept:
    """Keys from unsigned or signed integers of 1, 2, 4 or 8 bytes; False for other types."""
    cdef uint64_t *out = <uint64_t *>dst
    cdef Py_ssize_t i
    cdef uint64_t v
    cdef int64_t s
    cdef bint signed = code in b"bhilq"
    if code not in b"BHILQbhilq" or size not in (1, 2, 4, 8):
        return False
    with nogil:
        for i in range(n):
            if size == 4:
                v = (<const uint32_t *>src)[i]
                s = (<const int32_t *>src)[i]
            elif size == 8:
                v = (<const uint64_t *>src)[i]
                s = (<const int64_t *>src)[i]
            elif size == 2:
                v = (<const uint16_t *>src)[i]
                s = <int64_t>(<const short *>src)[i]
            else:
                v = (<const uint8_t *>src)[i]
                s = <int64_t>(<const signed char *>src)[i]
            if signed:
                if s < 0:
                    bad[0] = True
                    break
                v = <uint64_t>s
            if v >> 32:
                bad[0] = True
                break
            out[i] = base | v
    return True


# -- remote routing ---------------------------------------------------------------------------


cdef class Router:
    """Remote page locations -> operations in each link's op array, from the replica tables.

    ``bind`` points it at the RemoteTier's tables (indexed [replica slot, slab id]), a live
    flag per link and each link's op array; the tier binds again whenever links or tables
    change.  ``route`` writes the batch's operations (page order within a link) and returns
    ``[(link index, count), ...]`` of the links it filled, or None for the failover path.
    """
    # attributes: rram/_ext/_storepath.pxd (the C request path, ext/_reqpath.pyx, routes with it too)

    def __cinit__(self):
        self.nlinks = 0
        self.nused = 0
        self.alive = NULL
        self.ops = NULL
        self.cap = NULL
        self.count = NULL
        self.used = NULL
        self._keep = []

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        free(self.alive)
        free(self.ops)
        free(self.cap)
        free(self.count)
        free(self.used)
        self.alive = NULL
        self.ops = NULL
        self.cap = NULL
        self.count = NULL
        self.used = NULL
        self.nlinks = 0
        self.nused = 0
        self.nrep = 0
        self.width = 0

    def bind(self, rep_link, rep_addr, rep_rkey, rep_ready, alive, ops):
        """rep_*: C-contiguous (replicas, slabs) int32 / uint64 / uint32 / uint8 tables;
        ``alive``: a truth value per link; ``ops``: each link's OP_DTYPE array."""
        cdef int i, n, nlinks = len(ops)
        cdef Py_ssize_t cells
        if rep_link.ndim != 2 or rep_addr.shape != rep_link.shape or rep_rkey.shape != rep_link.shape \
                or rep_ready.shape != rep_link.shape or len(alive) != nlinks:
            raise ValueError("replica tables of different shapes, or not one alive flag per link")
        self._release()
        self._keep = [rep_link, rep_addr, rep_rkey, rep_ready, list(ops)]
        cells = rep_link.shape[0] * rep_link.shape[1]
        self.rep_link = <const int32_t *>_data(rep_link, 4, cells, False, "rep_link")
        self.rep_addr = <const uint64_t *>_data(rep_addr, 8, cells, False, "rep_addr")
        self.rep_rkey = <const uint32_t *>_data(rep_rkey, 4, cells, False, "rep_rkey")
        self.rep_ready = <const uint8_t *>_data(rep_ready, 1, cells, False, "rep_ready")
        n = max(1, nlinks)
        self.alive = <uint8_t *>malloc(n * sizeof(uint8_t))
        self.ops = <op_t **>malloc(n * sizeof(op_t *))
        self.cap = <uint32_t *>malloc(n * sizeof(uint32_t))
        self.count = <uint32_t *>malloc(n * sizeof(uint32_t))
        self.used = <int32_t *>malloc(n * sizeof(int32_t))
        if not (self.alive and self.ops and self.cap and self.count and self.used):
            self._release()
            raise MemoryError()
        for i in range(nlinks):
            self.alive[i] = 1 if alive[i] else 0
            self.cap[i] = len(ops[i])
            self.ops[i] = <op_t *>_data(ops[i], sizeof(op_t), self.cap[i], True, "ops")
            self.count[i] = 0
        self.nrep = rep_link.shape[0]
        self.width = rep_link.shape[1]
        self.nlinks = nlinks

    cdef void _reset(self) noexcept nogil:
        cdef int k
        for k in range(self.nused):
            self.count[self.used[k]] = 0
        self.nused = 0

    cdef int _add(self, int li, uint8_t opcode, uint64_t laddr, uint64_t raddr, uint32_t length,
                         int64_t lkey, uint32_t rkey) noexcept nogil:
        """Append one op to link li's array; -1 when it is full or the link has no lkey."""
        cdef uint32_t c = self.count[li]
        cdef op_t *op
        if c >= self.cap[li] or lkey < 0:
            return -1
        if c == 0:
            self.used[self.nused] = li
            self.nused += 1
        op = &self.ops[li][c]
        op.local_addr = laddr
        op.remote_addr = raddr
        op.length = length
        op.lkey = <uint32_t>lkey
        op.rkey = rkey
        op.opcode = opcode
        self.count[li] = c + 1
        return 0

    cdef int _read(self, uint64_t loc, uint64_t dst, const int64_t *lkeys) noexcept nogil:
        """READ one page from a ready replica on a live link, the slab's own one first (RemoteTier.read's
        choice: starting at replica ``slab % nrep`` spreads the reads of a cluster over every copy)."""
        cdef uint64_t slab = loc_slab(loc)
        cdef Py_ssize_t k
        cdef int j, li
        if slab >= <uint64_t>self.width:
            return -1
        for j in range(self.nrep):
            k = <Py_ssize_t>((slab + <uint64_t>j) % <uint64_t>self.nrep) * self.width + <Py_ssize_t>slab
            li = self.rep_link[k]
            if 0 <= li < self.nlinks and self.alive[li] and self.rep_ready[k]:
                return self._add(li, OP_READ, dst, self.rep_addr[k] + loc_offset(loc), loc_size(loc),
                                 lkeys[li], self.rep_rkey[k])
        return -1

    cdef int _write(self, uint64_t loc, uint64_t src, const int64_t *lkeys) noexcept nogil:
        """WRITE one page to every replica on a live link; -1 when there is none."""
        cdef uint64_t slab = loc_slab(loc)
        cdef Py_ssize_t k
        cdef int j, li, held = 0
        if slab >= <uint64_t>self.width:
            return -1
        for j in range(self.nrep):
            k = j * self.width + <Py_ssize_t>slab
            li = self.rep_link[k]
            if 0 <= li < self.nlinks and self.alive[li]:
                if self._add(li, OP_WRITE, src, self.rep_addr[k] + loc_offset(loc), loc_size(loc),
                             lkeys[li], self.rep_rkey[k]) < 0:
                    return -1
                held += 1
        return 0 if held else -1

    cdef list _batches(self):
        return [(self.used[k], self.count[self.used[k]]) for k in range(self.nused)]

    def route(self, bint write, const uint64_t[:] locs, const uint64_t[:] addrs, Py_ssize_t n, lkeys):
        """Operations for pages locs[:n] <-> local addresses addrs[:n]; ``lkeys``: int64 per link
        (-1: none for this arena).  Returns [(link, count), ...] or None (take the failover path)."""
        cdef Py_ssize_t i
        cdef int rc = 0
        cdef const int64_t *lk
        if n < 0 or n > locs.shape[0] or n > addrs.shape[0]:
            raise ValueError(f"n={n} exceeds locs ({locs.shape[0]}) or addrs ({addrs.shape[0]})")
        if self.nlinks == 0:
            return None
        lk = <const int64_t *>_data(lkeys, 8, self.nlinks, False, "lkeys")
        with nogil:
            self._reset()
            for i in range(n):
                rc = self._write(locs[i], addrs[i], lk) if write else self._read(locs[i], addrs[i], lk)
                if rc < 0:
                    break
        return None if rc < 0 else self._batches()


# -- the store's batch bookkeeping ------------------------------------------------------------


cdef class StorePath:
    """A PageStore's batch steps over its local pool and its own scratch arrays.

    ``local_base[slab]`` is the address of local slab 1..last_local; page i of a batch is
    compressed to ``staging + i*4096`` and READ from a provider to ``read_base + i*read_stride``
    (the staging arena again, or the seal buffer whose slots hold an image and its tag).  The scratch arrays (``batch`` entries each) are filled
    by plan_get (srcs, sizes: decompress_pages' arguments) and split_put (the rest).
    """
    cdef const uint64_t *local_base
    cdef uint64_t last_local
    cdef uint64_t staging
    cdef uint64_t read_base
    cdef uint64_t read_stride
    cdef Py_ssize_t batch
    cdef object _local_base
    cdef readonly object srcs, sizes, zero_keys, nz_keys, nz_sizes, nz_srcs
    cdef uint64_t *_srcs
    cdef uint32_t *_sizes
    cdef uint64_t *_zero_keys
    cdef uint64_t *_nz_keys
    cdef uint32_t *_nz_sizes
    cdef uint64_t *_nz_srcs
    #: after plan_get: pages found (not absent), decompressed from the local pool, read remotely
    cdef readonly Py_ssize_t found
    cdef readonly Py_ssize_t local
    cdef readonly Py_ssize_t remote

    def __cinit__(self, local_base, uint64_t last_local, uint64_t staging, Py_ssize_t batch,
                  uint64_t read_base=0, uint64_t read_stride=PAGE):
        self._local_base = local_base
        self.local_base = <const uint64_t *>_data(local_base, 8, last_local + 1, False, "local_base")
        self.last_local = last_local
        self.staging = staging
        self.read_base = read_base or staging
        self.read_stride = read_stride
        self.batch = batch
        self.srcs = np.zeros(batch, dtype=np.uint64)
        self.sizes = np.zeros(batch, dtype=np.uint32)
        self.zero_keys = np.zeros(batch, dtype=np.uint64)
        self.nz_keys = np.zeros(batch, dtype=np.uint64)
        self.nz_sizes = np.zeros(batch, dtype=np.uint32)
        self.nz_srcs = np.zeros(batch, dtype=np.uint64)
        self._srcs = <uint64_t *>_data(self.srcs, 8, batch, True, "srcs")
        self._sizes = <uint32_t *>_data(self.sizes, 4, batch, True, "sizes")
        self._zero_keys = <uint64_t *>_data(self.zero_keys, 8, batch, True, "zero_keys")
        self._nz_keys = <uint64_t *>_data(self.nz_keys, 8, batch, True, "nz_keys")
        self._nz_sizes = <uint32_t *>_data(self.nz_sizes, 4, batch, True, "nz_sizes")
        self._nz_srcs = <uint64_t *>_data(self.nz_srcs, 8, batch, True, "nz_srcs")

    cdef int _check_n(self, Py_ssize_t n, Py_ssize_t have) except -1:
        if n < 0 or n > self.batch or n > have:
            raise ValueError(f"n={n} exceeds the batch ({self.batch}) or an array ({have})")
        return 0

    def plan_get(self, const uint64_t[:] locs, Py_ssize_t n, found_out, Router router, lkeys):
        """Fill srcs[:n] / sizes[:n] for decompress_pages, found_out[:n] (bool) and, through
        ``router``, the READs of remote pages into the read slots (``lkeys``: that arena's).

        Returns the router's batches ([] when nothing is remote), or None for the failover path.
        """
        cdef Py_ssize_t i, nf = 0, nl = 0, nr = 0
        cdef uint64_t loc, slab, kind
        cdef uint8_t *fd
        cdef const int64_t *lk = NULL
        cdef int rc = 0
        self._check_n(n, locs.shape[0])
        fd = <uint8_t *>_data(found_out, 1, n, True, "found_out")
        if router is not None and router.nlinks:
            lk = <const int64_t *>_data(lkeys, 8, router.nlinks, False, "lkeys")
        with nogil:
            if router is not None:
                router._reset()
            for i in range(n):
                loc = locs[i]
                kind = loc & KIND_MASK
                fd[i] = kind != KIND_ABSENT
                nf += fd[i]
                if kind != KIND_STORED:
                    self._srcs[i] = 0
                    self._sizes[i] = 0
                    continue
                slab = loc_slab(loc)
                self._sizes[i] = loc_size(loc)
                if slab <= self.last_local:
                    self._srcs[i] = self.local_base[slab] + loc_offset(loc)
                    nl += 1
                    continue
                self._srcs[i] = self.read_base + <uint64_t>i * self.read_stride
                nr += 1
                if lk == NULL:
                    rc = -1
                    break
                rc = router._read(loc, self._srcs[i], lk)
                if rc < 0:
                    break
        if rc < 0:
            return None
        self.found = nf
        self.local = nl
        self.remote = nr
        return router._batches() if nr else []

    def split_put(self, const uint32_t[:] sizes, const uint64_t[:] keys, Py_ssize_t n):
        """Split a compressed batch (sizes[i] of the image staged for keys[i]): the keys of zero
        pages to zero_keys, the others with their size and staging address to nz_keys, nz_sizes,
        nz_srcs.  Returns the number of non-zero pages."""
        cdef Py_ssize_t i, z = 0, m = 0
        self._check_n(n, min(sizes.shape[0], keys.shape[0]))
        with nogil:
            for i in range(n):
                if sizes[i] == 0:
                    self._zero_keys[z] = keys[i]
                    z += 1
                else:
                    self._nz_keys[m] = keys[i]
                    self._nz_sizes[m] = sizes[i]
                    self._nz_srcs[m] = self.staging + <uint64_t>i * PAGE
                    m += 1
        return m

    cdef inline bint _local_addr(self, uint64_t loc, uint64_t *out) noexcept nogil:
        """*out = address of local slot ``loc``; False when it is not one."""
        cdef uint64_t slab = loc_slab(loc)
        if slab == 0 or slab > self.last_local or (loc & KIND_MASK) != KIND_STORED:
            return False
        out[0] = self.local_base[slab] + loc_offset(loc)
        return True

    def local_addrs(self, const uint64_t[:] locs, Py_ssize_t n, uint64_t[::1] out):
        """out[i] = address of local slot locs[i] (stored locations in slabs 1..last_local)."""
        cdef Py_ssize_t i, bad = -1
        if n < 0 or n > locs.shape[0] or n > out.shape[0]:
            raise ValueError(f"n={n} exceeds locs ({locs.shape[0]}) or out ({out.shape[0]})")
        with nogil:
            for i in range(n):
                if not self._local_addr(locs[i], &out[i]):
                    bad = i
                    break
        if bad >= 0:
            raise ValueError(f"locs[{bad}] = {locs[bad]:#x} is not a local slot")

    def copy_local(self, const uint64_t[:] locs, const uint64_t[:] srcs, const uint32_t[:] sizes, Py_ssize_t n):
        """Copy sizes[i] bytes from address srcs[i] into local slot locs[i] (local_addrs + copy_batch)."""
        cdef Py_ssize_t i, bad = -1
        cdef uint64_t dst
        if n < 0 or n > locs.shape[0] or n > srcs.shape[0] or n > sizes.shape[0]:
            raise ValueError(f"n={n} exceeds locs ({locs.shape[0]}), srcs or sizes")
        with nogil:
            for i in range(n):
                if not self._local_addr(locs[i], &dst) or sizes[i] > PAGE:
                    bad = i
                    break
                memcpy(<void *>dst, <const void *>srcs[i], sizes[i])
        if bad >= 0:
            raise ValueError(f"locs[{bad}] = {locs[bad]:#x} is not a local slot of {sizes[bad]} bytes")

    def split_free(self, const uint64_t[:] locs, Py_ssize_t n, uint64_t[::1] out):
        """Stored locations of locs[:n] to free: local ones to out[:nl], remote ones to
        out[nl:nl+nr] (absent and zero pages skipped).  Returns (nl, nr)."""
        cdef Py_ssize_t i, nl = 0, k
        if n < 0 or n > locs.shape[0] or n > out.shape[0]:
            raise ValueError(f"n={n} exceeds locs ({locs.shape[0]}) or out ({out.shape[0]})")
        with nogil:
            for i in range(n):
                if (locs[i] & KIND_MASK) == KIND_STORED and loc_slab(locs[i]) <= self.last_local:
                    out[nl] = locs[i]
                    nl += 1
            k = nl
            for i in range(n):
                if (locs[i] & KIND_MASK) == KIND_STORED and loc_slab(locs[i]) > self.last_local:
                    out[k] = locs[i]
                    k += 1
        return nl, k - nl
