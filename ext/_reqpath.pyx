# cython: language_level=3
"""The page store's request path: one 4 KiB page read or written in C, without the GIL.

The kernel's swap I/O arrives mostly as single 4 KiB requests, and for those the Python store
(a dozen C calls stitched together per page) costs several times what the work does.  A
RequestPath serves one page on the store's own tables, cimported (rram/_ext/*.pxd), so that no
Python object is made or touched between them:

  read_page:  page map -> zero fill (absent, zero page) | expand from the local pool
  write_page: compress -> local slot (owner = the key) -> copy -> page map -> free the old slot

A write that replaces a remote copy leaves the old remote location on a short list, and the
store frees those (remote slots, then slabs left empty: policy) the next time Python holds its
lock (``PageStore._reap_retired``); until then the slot is merely not reused.

Anything else it does not try: a page in a remote slab, a full local pool (remotify is policy),
a full list of retired remote copies, a corrupt image, a closed store or a pool that is gone.  It then answers a REQ_* code having changed nothing, and
the caller serves that request on the Python path, which keeps control, policy and errors.

Sealing (an AEAD over the compressed image, for pages that leave this host) goes between
compress and the remote WRITE and between the remote READ and expand; this path touches only
local images today, so it has no seal step yet: a remote READ added here would open the image
in the staging buffer before ``expand``.

Mutual exclusion: the store's lock is a StoreLock, a recursive pthread mutex.  Python takes it
(``with store._lock``) around every use of the tables, releasing the GIL while it waits; this
path takes it around each page.  So a request sees the tables between two Python operations
(a put, a remotify, a repair step), never in the middle of one, and the Python path never sees
a half-done request.  Nobody waits for the mutex while holding the GIL, so the two cannot
deadlock.  The tables' ``busy`` flags are checked as a second line: a Python call that
somehow runs without the lock makes this path step aside rather than corrupt anything.
"""
from libc.errno cimport EBUSY
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

from location cimport FIRST_REMOTE_SLAB, KIND_MASK, KIND_STORED, KIND_ZERO, loc_offset, loc_size, loc_slab
from rram._ext._codec cimport compress_page, expand
from rram._ext._pagemap cimport PageMap
from rram._ext._slab cimport E_OK, SlotAllocator

from rram.errors import RramError


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutexattr_init(pthread_mutexattr_t *attr)
    int pthread_mutexattr_settype(pthread_mutexattr_t *attr, int kind)
    int pthread_mutexattr_destroy(pthread_mutexattr_t *attr)
    int pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int PTHREAD_MUTEX_RECURSIVE


cdef enum:
    PAGE = 4096
    RETIRED_MAX = 1024         # remote copies replaced between two visits of Python
    READ = 0
    WRITE = 1

OUTCOMES = ("done", "remote", "local_full", "old_remote", "corrupt", "unavailable")


cdef class StoreLock:
    """The page store's lock: re-entrant like threading.RLock, and usable from C without the GIL."""

    def __cinit__(self):
        cdef pthread_mutexattr_t attr
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE)
        rc = pthread_mutex_init(&self.mutex, &attr)
        pthread_mutexattr_destroy(&attr)
        if rc != 0:
            raise OSError(rc, "pthread_mutex_init failed")

    def __dealloc__(self):
        pthread_mutex_destroy(&self.mutex)

    cdef void lock(self) noexcept nogil:
        pthread_mutex_lock(&self.mutex)

    cdef void unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.mutex)

    def acquire(self):
        # uncontended: no GIL round trip; contended: wait without the GIL, so the holder (which
        # may be a C request that never takes the GIL, or a Python thread) can go on
        if pthread_mutex_trylock(&self.mutex) == EBUSY:
            with nogil:
                pthread_mutex_lock(&self.mutex)
        return True

    def release(self):
        cdef int rc = pthread_mutex_unlock(&self.mutex)
        if rc != 0:
            raise RuntimeError("StoreLock released by a thread that does not hold it")

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


cdef class RequestPath:
    """Single-page reads and writes on a page store's page map and local pool; see the module doc.

    Made by the PageStore from its own tables and lock; ``enabled`` False makes every request
    answer REQ_UNAVAILABLE (so callers take the Python path).
    """

    def __init__(self, StoreLock store_lock, PageMap pagemap, SlotAllocator local, local_base, uint64_t n_local):
        cdef const uint64_t[::1] bases = local_base
        if not local.track_owners:
            raise ValueError("the local allocator must track owners (remotify picks victims by owner)")
        if bases.shape[0] < <Py_ssize_t>n_local + 1:
            raise ValueError(f"local_base has {bases.shape[0]} entries, fewer than {n_local} local slabs + 1")
        self.store_lock = store_lock
        self.map = pagemap
        self.local = local
        self._local_base = local_base  # keeps the addresses alive
        self.base = &bases[0]
        self.n_local = n_local
        memset(self.pools, 0, sizeof(self.pools))
        memset(self.outcomes, 0, sizeof(self.outcomes))
        self.zero_reads = self.absent_reads = self.zero_writes = self.bytes_in = self.bytes_stored = 0
        self.enabled = True
        self.closed = False
        self.retired = <uint64_t *>malloc(RETIRED_MAX * sizeof(uint64_t))
        if self.retired == NULL:
            raise MemoryError()
        self.retired_cap = RETIRED_MAX
        self.nretired = 0

    def __dealloc__(self):
        free(self.retired)

    # -- control (Python calls these holding the store's lock) -------------------------------

    def set_pool(self, int pool, bint exists):
        if not 0 <= pool < 256:
            raise ValueError(f"pool must be 0..255, got {pool}")
        self.pools[pool] = exists

    def close(self):
        self.closed = True

    def take_retired(self, uint64_t[::1] out):
        """Move the retired remote locations into ``out`` (room for RETIRED_MAX); how many."""
        cdef Py_ssize_t n = self.nretired
        if out.shape[0] < n:
            raise ValueError(f"out holds {out.shape[0]} locations, fewer than the {n} retired")
        if n:
            memcpy(&out[0], self.retired, n * sizeof(uint64_t))
        self.nretired = 0
        return n

    # -- the path ------------------------------------------------------------------------------

    cdef bint _usable(self, uint64_t key) noexcept nogil:
        return (self.enabled and not self.closed and self.pools[key >> 56]
                and not self.map.busy and not self.local.busy)

    cdef int read_page(self, uint64_t key, uint8_t *dst) noexcept nogil:
        """The page ``key`` into ``dst`` (4096 bytes; zeros when never written): REQ_DONE, or the
        reason the Python path must serve it (``dst`` is then unspecified)."""
        cdef uint64_t loc, slab
        cdef int rc = REQ_DONE
        self.store_lock.lock()
        if not self._usable(key):
            rc = REQ_UNAVAILABLE
        else:
            loc = self.map._get(key)
            if (loc & KIND_MASK) != KIND_STORED:
                memset(dst, 0, PAGE)
                if (loc & KIND_MASK) == KIND_ZERO:
                    self.zero_reads += 1
                else:
                    self.absent_reads += 1
            else:
                slab = loc_slab(loc)
                if slab >= FIRST_REMOTE_SLAB:
                    rc = REQ_REMOTE
                elif slab == 0 or slab > self.n_local:
                    rc = REQ_CORRUPT
                elif expand(<const char *>(self.base[slab] + loc_offset(loc)), loc_size(loc), <char *>dst) != PAGE:
                    rc = REQ_CORRUPT
        self.outcomes[READ][rc] += 1
        self.store_lock.unlock()
        return rc

    cdef int write_page(self, uint64_t key, const uint8_t *src) noexcept nogil:
        """Store the page at ``src`` (4096 bytes) as ``key``: REQ_DONE, or the reason the Python
        path must serve it (nothing changed then)."""
        cdef uint8_t image[PAGE]
        cdef uint32_t size = compress_page(src, image, 1)  # before the lock: the slow part
        cdef uint64_t old, new, slab
        cdef int err = E_OK, rc = REQ_DONE
        cdef bint nomem = False, old_remote
        self.store_lock.lock()
        if not self._usable(key):
            rc = REQ_UNAVAILABLE
        else:
            old = self.map._get(key)
            old_remote = (old & KIND_MASK) == KIND_STORED and loc_slab(old) >= FIRST_REMOTE_SLAB
            if old_remote and self.nretired == self.retired_cap:
                rc = REQ_OLD_REMOTE
            else:
                if size == 0:
                    new = KIND_ZERO
                else:
                    new = self.local._alloc_one(size, key, &err)
                if new == 0:
                    rc = REQ_LOCAL_FULL if err == E_OK else REQ_UNAVAILABLE
                else:
                    if size:
                        slab = loc_slab(new)
                        memcpy(<void *>(self.base[slab] + loc_offset(new)), image, size)
                    self.map._set(key, new, &nomem)
                    if nomem:  # the map could not grow: undo the slot, Python reports it
                        if size:
                            self.local._free_one(new)
                        rc = REQ_UNAVAILABLE
                    else:
                        if old_remote:
                            self.retired[self.nretired] = old
                            self.nretired += 1
                        else:  # a local slot, or nothing (never fails on a location the map held)
                            self.local._free_one(old)
                        self.bytes_in += PAGE
                        self.bytes_stored += size
                        if size == 0:
                            self.zero_writes += 1
        self.outcomes[WRITE][rc] += 1
        self.store_lock.unlock()
        return rc

    # -- Python entry points (tests and diagnosis; the NBD server calls the C methods) ----------

    def read(self, uint64_t key, uint8_t[::1] out):
        """read_page into ``out`` (4096 writable bytes); the REQ_* outcome."""
        if out.shape[0] != PAGE:
            raise ValueError(f"out must be {PAGE} bytes, got {out.shape[0]}")
        cdef int rc
        with nogil:
            rc = self.read_page(key, &out[0])
        return rc

    def write(self, uint64_t key, const uint8_t[::1] page):
        """write_page from ``page`` (4096 bytes); the REQ_* outcome."""
        if page.shape[0] != PAGE:
            raise ValueError(f"page must be {PAGE} bytes, got {page.shape[0]}")
        cdef int rc
        with nogil:
            rc = self.write_page(key, &page[0])
        return rc

    def counters(self):
        """What this path did, for the store's stats: outcomes per direction and what it stored."""
        out = {}
        for d, name in ((READ, "read"), (WRITE, "write")):
            for k in range(REQ_OUTCOMES):
                out[f"{name}_{OUTCOMES[k]}"] = self.outcomes[d][k]
        out.update(zero_reads=self.zero_reads, absent_reads=self.absent_reads, zero_writes=self.zero_writes,
                   bytes_in=self.bytes_in, bytes_stored=self.bytes_stored)
        return out


REQ = {name: k for k, name in enumerate(OUTCOMES)}
RETIRED_CAPACITY = RETIRED_MAX
