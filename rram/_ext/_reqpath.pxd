# The page store's single-request path (ext/_reqpath.pyx), declared for the NBD frontend's
# C connection loop (_nbdserve), which serves a request through it without the GIL.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from linkcore cimport core_ops_t
from rram._ext._pagemap cimport PageMap
from rram._ext._seal cimport Sealer
from rram._ext._slab cimport SlotAllocator
from rram._ext._storepath cimport Router


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass


cdef enum:
    # what read_page/write_page did; anything but DONE means nothing changed: serve it in Python
    REQ_DONE = 0
    REQ_REMOTE = 1       # a remote page C cannot read: routes not bound (they changed since Python
                         # last bound them, or C abandoned a READ it could not make sure of)
                         # or a link without a C core (loopback)
    REQ_LOCAL_FULL = 2   # no local slot: remotify is policy, Python's
    REQ_OLD_REMOTE = 3   # the write replaces a remote copy and the list of retired ones is full
    REQ_CORRUPT = 4      # the stored image does not expand to a page: Python reports it
    REQ_UNAVAILABLE = 5  # closed, switched off, pool gone, out of memory
    # remote READs in C (a read of remote pages declined for one of these sent nothing anywhere
    # the NBD client can see; Python's hedged read / failover path then serves it):
    REQ_NO_ROUTE = 6     # a page has no ready replica on a live link (degraded, repairing)
    REQ_LINK_BUSY = 7    # the link has batches in flight (Python's) or no connection
    REQ_LINK_FAILED = 8  # the link failed or timed out: noted for Python, which suspends it
    REQ_REMOTE_ERROR = 9 # an error completion (bad key...): Python reads again and reports it
    REQ_OUTCOMES = 10


cdef class StoreLock:
    cdef pthread_mutex_t mutex

    cdef void lock(self) noexcept nogil
    cdef void unlock(self) noexcept nogil


cdef class RequestPath:
    cdef StoreLock store_lock
    cdef PageMap map
    cdef SlotAllocator local
    cdef object _local_base          # the store's array: local slab id -> its address
    cdef const uint64_t *base
    cdef uint64_t n_local
    cdef uint8_t pools[256]          # 1: the pool exists
    cdef public bint enabled
    cdef bint closed
    cdef uint64_t outcomes[2][REQ_OUTCOMES]   # [read, write][REQ_*]
    cdef uint64_t zero_reads, absent_reads, zero_writes, bytes_in, bytes_stored
    # remote locations that writes replaced: Python frees them (remote slots, slab release)
    cdef uint64_t *retired
    cdef readonly Py_ssize_t nretired
    cdef Py_ssize_t retired_cap

    # -- remote READs: bound by bind_remote to the RemoteTier's router and each link's C core;
    # unbound (declining remote pages with REQ_REMOTE) whenever the tier's routes change
    cdef bint remote_bound
    cdef Router router               # the tier's router: replica tables, live links, op arrays
    cdef object _remote_keep         # what the pointers below point into
    cdef const int64_t *lkeys        # per link: the lkey of the staging arena
    cdef void **cores                # per link: its C core (borrowed), NULL: none
    cdef const core_ops_t **core_ops # per link: the functions that drive it (ext/linkcore.pxd)
    cdef int32_t *fail_rc            # per link: why C saw it fail (0: it did not), for Python
    cdef int32_t *fail_detail
    cdef int nlinks
    cdef readonly int nfailed        # links with a failure Python has not taken yet
    cdef uint64_t staging            # the registered staging arena: C's READ target
    cdef Py_ssize_t staging_pages
    cdef uint64_t stride             # bytes between two images READ into staging (PAGE; sealed: SEAL_STRIDE)
    cdef Sealer sealer               # sealed pages: opens them (None: images are stored as is)
    cdef SlotAllocator versions_r    # sealed pages: the remote allocators whose owner words are
    cdef SlotAllocator versions_e    # the versions (r-copy slabs, one-copy slabs)
    cdef int64_t read_timeout_ns
    cdef uint64_t batch_seq          # C's batch ids: bit 63 set, never one of Python's
    cdef uint64_t remote_reads, remote_batches
    cdef uint64_t remote_abandoned, remote_unsure   # batches C gave up on; of those, not made sure of

    cdef void _free_links(self)
    cdef bint _usable(self, uint64_t key) noexcept nogil
    cdef int read_page(self, uint64_t key, uint8_t *dst) noexcept nogil
    cdef int read_pages(self, uint64_t key_base, const uint32_t *pages, Py_ssize_t n, uint8_t *dst) noexcept nogil
    cdef int _read_chunk(self, uint64_t key_base, const uint32_t *pages, Py_ssize_t n, uint8_t *dst,
                         uint64_t *zero, uint64_t *absent, uint64_t *remote) noexcept nogil
    cdef int _read_remote(self, const uint64_t *locs, Py_ssize_t n) noexcept nogil
    cdef bint _unseal(self, uint8_t *image, uint32_t *size, uint64_t loc, uint64_t key) noexcept nogil
    cdef void _note_failure(self, int li, int32_t rc, int32_t detail) noexcept nogil
    cdef int write_page(self, uint64_t key, const uint8_t *src) noexcept nogil
