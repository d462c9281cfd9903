# The page store's single-page request path (ext/_reqpath.pyx), declared for the NBD frontend's
# C parser (_nbdwire), which serves a request through it without the GIL.
from libc.stdint cimport uint8_t, uint64_t

from rram._ext._pagemap cimport PageMap
from rram._ext._slab cimport SlotAllocator


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass


cdef enum:
    # what read_page/write_page did; anything but DONE means nothing changed: serve it in Python
    REQ_DONE = 0
    REQ_REMOTE = 1       # the page is in a remote slab
    REQ_LOCAL_FULL = 2   # no local slot: remotify is policy, Python's
    REQ_OLD_REMOTE = 3   # the write replaces a remote copy and the list of retired ones is full
    REQ_CORRUPT = 4      # the stored image does not expand to a page: Python reports it
    REQ_UNAVAILABLE = 5  # closed, switched off, pool gone, out of memory
    REQ_OUTCOMES = 6


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

    cdef bint _usable(self, uint64_t key) noexcept nogil
    cdef int read_page(self, uint64_t key, uint8_t *dst) noexcept nogil
    cdef int write_page(self, uint64_t key, const uint8_t *src) noexcept nogil
