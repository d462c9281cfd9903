# cython: language_level=3
"""The page store's request path: one NBD request's pages read or written in C, without the GIL.

The kernel's swap I/O arrives mostly as single 4 KiB requests, and for those the Python store
(a dozen C calls stitched together per page) costs several times what the work does.  A
RequestPath serves one request on the store's own tables, cimported (rram/_ext/*.pxd), so that
no Python object is made or touched between them:

  read_pages: page map -> zero fill (absent, zero page) | expand from the local pool
              | remote: Router picks a ready replica on a live link (the tier's own router and
                choice), one READ batch per link posted on the link's C core (tcp: _tcpwire's
                WireRequester; verbs: _verbs' QP) and polled to completion, into the staging
                arena -> unseal (``_unseal``) -> expand
  write_page: compress -> local slot (owner = the key) -> copy -> page map -> free the old slot

A write that replaces a remote copy leaves the old remote location on a short list, and the
store frees those (remote slots, then slabs left empty: policy) the next time Python holds its
lock (``PageStore._reap_retired``); until then the slot is merely not reused.

Anything else it does not try: a full local pool (remotify is policy), a full list of retired
remote copies, a corrupt image, a closed store or a pool that is gone; and for remote pages: no
route bound, no ready replica on a live link, a link busy with Python's batches or without a C
core (loopback), a link that fails, times out (RemoteTier.read_timeout) or answers with an
error.  It then answers a REQ_* code having changed nothing and sent nothing to the client,
and the caller serves that request on the Python path (hedged reads, failover), which keeps
control, policy and errors.  A link that failed under C is noted (``take_failures``); the store
suspends it the next time Python holds its lock, as Python's own fast path would have.

Remote routes: ``bind_remote`` (Python, under the lock) points this path at the RemoteTier's
router, the staging arena's lkeys and each link's C core; ``unbind_remote`` runs from
RemoteTier.invalidate_routes, under the same lock, whenever links, their state or the tables'
arrays change (failover, drain, suspension, growth), so C never uses a stale binding; the
store binds again before its next operation.  Values inside the tables (a replica becoming
ready, a repair's target) change in place, under the lock, and C reads them under it.
C's batch ids have bit 63 set (Python's count up from 1), and C posts only on a link with no
batch outstanding, and holds the store lock until its batches complete, so Python never sees
them in flight.

Link cores: each link's core comes with its table of C functions (ext/linkcore.pxd: idle, post,
poll, detail, abandon), tcp's below, verbs' from the QP (``QP.c_interface()``), so that one
path drives both.  A completion counts only with C's own batch id (as tcp checks it; a verbs
completion's wr_id names the QP slot that holds the id).  Whatever C gives up on (no completion
by the read timeout, a failed post or poll, an error completion) it ``abandon``s before the lock
is released: tcp has nothing to do (READ data lands only inside its own poll), verbs moves the QP
to the error state, so the device drops late READ responses, and waits for the flush of the
batch.  Only then may staging be reused.  If the flush does not come (abandon says it is not
certain), C unbinds its remote routes: nothing reads remote pages in C until Python has taken
the failure and suspended the link, which deregisters staging from that endpoint
(RemoteTier.suspend, the fence Python's own timeouts rely on), and bound the routes again.  A
link C leaves unusable after abandoning its batch (a verbs QP in error, until ``recover()``) is
noted failed, whatever the completion said.

Sealed pages (an AEAD over the compressed image, for pages that leave this host; ext/_seal.pyx):
the remote READ lands in the store's seal buffer (an image and its tag a SEAL_STRIDE), and
``_unseal`` opens it in place with the version its slot's owner word holds before ``expand``;
a page that does not open declines, and Python reads its other copies and counts the failure.

Mutual exclusion: the store's lock is a StoreLock, a recursive pthread mutex.  Python takes it
(``with store._lock``) around every use of the tables, releasing the GIL while it waits; this
path takes it around each request (a remote READ's round trip included, as Python's get does).
So a request sees the tables between two Python operations (a put, a remotify, a repair step),
never in the middle of one, and the Python path never sees a half-done request.  Nobody waits
for the mutex while holding the GIL, so the two cannot deadlock.  The tables' ``busy`` flags
are checked as a second line: a Python call that somehow runs without the lock makes this path
step aside rather than corrupt anything.
"""
from libc.errno cimport EBUSY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_New
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import numpy as np

from linkcore cimport CORE_TCP, core_ops_capsule, core_ops_t
from location cimport FIRST_REMOTE_SLAB, KIND_ABSENT, KIND_MASK, KIND_STORED, KIND_ZERO, loc_offset, loc_size, loc_slab
from ops cimport WC_FATAL_ERR, WC_RETRY_EXC_ERR, WC_SUCCESS, WC_WR_FLUSH_ERR, completion_t, op_t
from rram._ext._codec cimport compress_page, expand
from rram._ext._pagemap cimport PageMap
from rram._ext._seal cimport SEAL_STRIDE, SEAL_TAG, Sealer
from rram._ext._slab cimport E_OK, SlotAllocator
from rram._ext._storepath cimport Router
from rram._ext._tcpwire cimport C_EINTR, WireRequester

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
    CHUNK = 16                 # pages of a request read remotely per round trip (staging holds >= 16)
    FAIL_TIMEOUT = 1           # fail_rc: no completion within the read timeout (detail: ms)
    FAIL_STATUS = 2            # fail_rc: a completion with a link-failure status (detail: it)
    GET_MISS = -1              # get(): the map holds no such page
                               # (negative fail_rc: the core's R_* code; detail: errno or 0)

# bit 63 of C's batch ids: Python's ids (Link.next_batch) count up from 1 and never reach it
cdef uint64_t C_BATCH_BIT = (<uint64_t>1) << 63

OUTCOMES = ("done", "remote", "local_full", "old_remote", "corrupt", "unavailable",
            "no_route", "link_busy", "link_failed", "remote_error")
FAILURES = {"timeout": FAIL_TIMEOUT, "status": FAIL_STATUS}


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


# -- a tcp link's core (ext/linkcore.pxd) over _tcpwire's WireRequester ----------------------------

cdef bint _tcp_idle(void *core) noexcept nogil:
    return (<WireRequester>core).fd >= 0 and not (<WireRequester>core).count

cdef int _tcp_post(void *core, const op_t *o, Py_ssize_t n, uint64_t batch_id) noexcept nogil:
    cdef int st = (<WireRequester>core)._encode(o, n, batch_id)
    if st == 0:
        st = (<WireRequester>core)._send_frame()
        while st == C_EINTR:  # a signal is Python's business (its thread checks it); go on sending
            st = (<WireRequester>core)._send_frame()
    return st

cdef Py_ssize_t _tcp_poll(void *core, completion_t *out, int64_t deadline) noexcept nogil:
    # the core checks the completion's sequence number and MAC before it reads a field of it: a
    # forged, replayed or reordered one is a failed link here, never a result
    cdef Py_ssize_t got = C_EINTR
    while got == C_EINTR:
        got = (<WireRequester>core)._poll(out, 1, deadline)
    return got

cdef int32_t _tcp_detail(void *core) noexcept nogil:
    return <int32_t>(<WireRequester>core).a

cdef bint _tcp_abandon(void *core) noexcept nogil:
    # READ data lands only inside the core's own poll: nothing can arrive behind C's back (the
    # batch stays outstanding, so C does not post on the link again; Python suspends it)
    return True

cdef core_ops_t TCP_CORE
TCP_CORE.kind = CORE_TCP
TCP_CORE.idle = _tcp_idle
TCP_CORE.post = _tcp_post
TCP_CORE.poll = _tcp_poll
TCP_CORE.detail = _tcp_detail
TCP_CORE.abandon = _tcp_abandon


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
        self.remote_bound = False
        self.router = None
        self.cores = NULL
        self.core_ops = NULL
        self.fail_rc = self.fail_detail = NULL
        self.nlinks = self.nfailed = 0
        self.batch_seq = self.remote_reads = self.remote_batches = 0
        self.remote_abandoned = self.remote_unsure = 0
        self.stride = PAGE
        self.sealer = None

    def __dealloc__(self):
        free(self.retired)
        self._free_links()

    cdef void _free_links(self):
        free(self.cores)
        free(self.core_ops)
        free(self.fail_rc)
        free(self.fail_detail)
        self.cores = NULL
        self.core_ops = NULL
        self.fail_rc = self.fail_detail = NULL
        self.nlinks = self.nfailed = 0

    # -- control (Python calls these holding the store's lock) -------------------------------

    def set_pool(self, int pool, bint exists):
        if not 0 <= pool < 256:
            raise ValueError(f"pool must be 0..255, got {pool}")
        self.pools[pool] = exists

    def close(self):
        self.closed = True
        self.unbind_remote()

    def bind_remote(self, Router router, lkeys, cores, uint64_t staging, Py_ssize_t staging_pages,
                    double read_timeout, Sealer sealer=None, SlotAllocator versions_r=None,
                    SlotAllocator versions_e=None):
        """Read remote pages in C from now on: ``router`` bound to the RemoteTier's current tables
        (RemoteTier.router), ``lkeys`` its int64 lkey per link of the arena at ``staging``
        (``staging_pages`` pages, C's READ target), ``cores`` per link its Endpoint.c_core(): a
        WireRequester, a verbs QP, or None (no C core: its pages decline), ``read_timeout`` in
        seconds.  Failures not yet taken are kept.
        Sealed pages: ``sealer`` opens each image READ (staging then holds SEAL_STRIDE bytes an
        image), its version being the owner word of its slot in ``versions_r`` or ``versions_e``."""
        cdef const int64_t[::1] lk = lkeys
        cdef int i, n = len(cores)
        cdef void **c
        cdef const core_ops_t **ops
        cdef int32_t *rc
        cdef int32_t *det
        if lk.shape[0] < n or router.nlinks != n:
            raise ValueError(f"{n} cores, {lk.shape[0]} lkeys and a router bound to {router.nlinks} links")
        stride = SEAL_STRIDE if sealer is not None else PAGE
        if sealer is not None and (versions_r is None or versions_e is None
                                   or not versions_r.track_owners or not versions_e.track_owners):
            raise ValueError("sealed pages need both remote allocators, tracking owners (the versions)")
        if staging_pages * PAGE < CHUNK * stride:
            raise ValueError(f"the staging arena must hold {CHUNK} images of {stride} bytes, not {staging_pages} pages")
        tables = [_core_table(core) for core in cores]  # raises before anything changes
        self.remote_bound = False
        c = <void **>calloc(max(1, n), sizeof(void *))
        ops = <const core_ops_t **>calloc(max(1, n), sizeof(core_ops_t *))
        rc = <int32_t *>calloc(max(1, n), sizeof(int32_t))
        det = <int32_t *>calloc(max(1, n), sizeof(int32_t))
        if c == NULL or ops == NULL or rc == NULL or det == NULL:
            free(c)
            free(ops)
            free(rc)
            free(det)
            raise MemoryError()
        for i in range(min(n, self.nlinks)):  # links only ever join: indexes stay
            rc[i], det[i] = self.fail_rc[i], self.fail_detail[i]
        for i in range(n):
            if cores[i] is not None:
                c[i] = <void *>cores[i]
                ops[i] = <const core_ops_t *>PyCapsule_GetPointer(tables[i], core_ops_capsule())
        nfailed = self.nfailed
        self._free_links()
        self.cores, self.core_ops, self.nlinks = c, ops, n
        self.fail_rc, self.fail_detail, self.nfailed = rc, det, nfailed
        self._remote_keep = (router, lkeys, list(cores), tables)
        self.router = router
        self.lkeys = &lk[0]
        self.staging = staging
        self.staging_pages = staging_pages
        self.stride = stride
        self.sealer, self.versions_r, self.versions_e = sealer, versions_r, versions_e
        self.read_timeout_ns = <int64_t>(read_timeout * 1e9)
        self.remote_bound = True

    def unbind_remote(self):
        """Routes changed (RemoteTier.invalidate_routes): decline remote pages until bound again."""
        self.remote_bound = False

    @property
    def remote_is_bound(self):
        return bool(self.remote_bound)

    def take_failures(self):
        """The links C saw fail since the last call: [(link index, code, detail)], and forget them.
        code < 0: the core's R_* result (detail: errno or 0); FAILURES["timeout"] (detail: the
        timeout in ms); FAILURES["status"] (detail: the completion status)."""
        out = []
        cdef int i
        for i in range(self.nlinks):
            if self.fail_rc[i]:
                out.append((i, self.fail_rc[i], self.fail_detail[i]))
                self.fail_rc[i] = self.fail_detail[i] = 0
        self.nfailed = 0
        return out

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
        """The page ``key`` into ``dst`` (4096 bytes; zeros when never written): read_pages of one."""
        cdef uint32_t none = 0
        return self.read_pages(key, &none, 1, dst)

    cdef int read_pages(self, uint64_t key_base, const uint32_t *pages, Py_ssize_t n, uint8_t *dst) noexcept nogil:
        """Pages ``key_base | pages[i]`` (i < n, one pool) into dst + i*4096: REQ_DONE, or the reason
        the Python path must serve the whole request (``dst`` is then unspecified).

        Counted per page when done, per request when declined."""
        cdef uint64_t zero = 0, absent = 0, remote = 0
        cdef Py_ssize_t i = 0, k
        cdef int rc = REQ_DONE
        self.store_lock.lock()
        if not self._usable(key_base):
            rc = REQ_UNAVAILABLE
        while rc == REQ_DONE and i < n:
            k = n - i if n - i < CHUNK else CHUNK
            rc = self._read_chunk(key_base, pages + i, k, dst + i * PAGE, &zero, &absent, &remote)
            i += k
        if rc == REQ_DONE:
            self.outcomes[READ][REQ_DONE] += <uint64_t>n
            self.zero_reads += zero
            self.absent_reads += absent
            self.remote_reads += remote
        else:
            self.outcomes[READ][rc] += 1
        self.store_lock.unlock()
        return rc

    cdef int _read_chunk(self, uint64_t key_base, const uint32_t *pages, Py_ssize_t n, uint8_t *dst,
                         uint64_t *zero, uint64_t *absent, uint64_t *remote) noexcept nogil:
        """read_pages for n <= CHUNK pages, under the lock: remote images first (a decline then
        wastes no expand), then every page expanded in place."""
        cdef uint64_t locs[CHUNK]
        cdef uint64_t rlocs[CHUNK]
        cdef uint64_t loc, slab
        cdef uint32_t size
        cdef uint8_t *image
        cdef Py_ssize_t i, m = 0
        cdef int rc
        for i in range(n):
            locs[i] = loc = self.map._get(key_base | pages[i])
            if (loc & KIND_MASK) == KIND_STORED and loc_slab(loc) >= FIRST_REMOTE_SLAB:
                rlocs[m] = loc
                m += 1
        if m:
            rc = self._read_remote(rlocs, m)  # the images land at staging + k*stride, in page order
            if rc != REQ_DONE:
                return rc
        m = 0
        for i in range(n):
            loc = locs[i]
            if (loc & KIND_MASK) != KIND_STORED:
                memset(dst + i * PAGE, 0, PAGE)
                if (loc & KIND_MASK) == KIND_ZERO:
                    zero[0] += 1
                else:
                    absent[0] += 1
                continue
            slab = loc_slab(loc)
            size = loc_size(loc)
            if slab >= FIRST_REMOTE_SLAB:
                image = <uint8_t *>(self.staging + <uint64_t>m * self.stride)
                m += 1
                if not self._unseal(image, &size, loc, key_base | pages[i]):
                    return REQ_REMOTE_ERROR  # Python reads the other copies, counts and reports
            elif slab == 0 or slab > self.n_local:
                return REQ_CORRUPT
            else:
                image = <uint8_t *>(self.base[slab] + loc_offset(loc))
            if expand(<const char *>image, size, <char *>(dst + i * PAGE)) != PAGE:
                return REQ_CORRUPT
        remote[0] += <uint64_t>m
        return REQ_DONE

    cdef bint _unseal(self, uint8_t *image, uint32_t *size, uint64_t loc, uint64_t key) noexcept nogil:
        """Open a remote page's image in place (staging), between its READ and expand, with the
        version its slot's owner word holds: False when it does not verify (or has no version).
        Images of an unsealed store are stored as they are."""
        cdef uint64_t version = 0
        if self.sealer is None:
            return True
        if self.versions_r._owner(loc, &version) != E_OK and self.versions_e._owner(loc, &version) != E_OK:
            return False
        # not counted: the request is declined, and Python reads this copy again and counts it
        if size[0] <= SEAL_TAG or self.sealer.open_one(image, size[0], key, version, False) != 1:
            return False
        size[0] -= SEAL_TAG
        return True

    cdef void _note_failure(self, int li, int32_t rc, int32_t detail) noexcept nogil:
        """Link ``li`` failed under C: no more C reads on it, and Python suspends it (take_failures)."""
        if self.fail_rc[li] == 0:
            self.nfailed += 1
        self.fail_rc[li] = rc
        self.fail_detail[li] = detail

    cdef int _read_remote(self, const uint64_t *locs, Py_ssize_t n) noexcept nogil:
        """READ the stored images of ``locs`` (n <= CHUNK remote locations) into staging + k*stride:
        one batch per link, posted on each link's C core and polled to completion or the read
        timeout; what C gives up on is abandoned before it returns (see the module doc).  Under
        the lock.  REQ_DONE, or the reason to decline."""
        cdef Py_ssize_t k
        cdef int u, li, posted = 0, sent = 0, rc = REQ_DONE, st
        cdef Py_ssize_t got
        cdef uint64_t bids[CHUNK]
        cdef bint settled[CHUNK]     # per used link: its batch succeeded, nothing more can land
        cdef int32_t status[CHUNK]   # per used link: the completion's status (-1: a wrong batch id)
        cdef int64_t deadline
        cdef completion_t comp
        cdef const core_ops_t *ops
        cdef void *core
        if not self.remote_bound:
            return REQ_REMOTE
        self.router._reset()
        for k in range(n):
            if self.router._read(locs[k], self.staging + <uint64_t>k * self.stride, self.lkeys) < 0:
                return REQ_NO_ROUTE
        for u in range(self.router.nused):
            li = self.router.used[u]
            if li >= self.nlinks or self.cores[li] == NULL:
                return REQ_REMOTE
            if self.fail_rc[li]:
                return REQ_LINK_FAILED
            if not self.core_ops[li].idle(self.cores[li]):
                return REQ_LINK_BUSY
        deadline = _now_ns() + self.read_timeout_ns
        for u in range(self.router.nused):
            li = self.router.used[u]
            core, ops = self.cores[li], self.core_ops[li]
            self.batch_seq += 1
            bids[u] = C_BATCH_BIT | self.batch_seq
            settled[u] = False
            st = ops.post(core, self.router.ops[li], self.router.count[li], bids[u])
            posted += 1  # a failed post may have sent part of the batch: abandoned below
            if st != 0:
                self._note_failure(li, st, ops.detail(core))
                rc = REQ_LINK_FAILED
                break
            sent += 1
        for u in range(posted):
            li = self.router.used[u]
            core, ops = self.cores[li], self.core_ops[li]
            if self.fail_rc[li]:
                continue  # its post failed
            got = ops.poll(core, &comp, deadline)
            if got == 0:
                self._note_failure(li, FAIL_TIMEOUT, <int32_t>(self.read_timeout_ns // 1000000))
                rc = REQ_LINK_FAILED
            elif got < 0:
                self._note_failure(li, <int32_t>got, ops.detail(core))
                rc = REQ_LINK_FAILED
            elif comp.status == WC_RETRY_EXC_ERR or comp.status == WC_FATAL_ERR or comp.status == WC_WR_FLUSH_ERR:
                self._note_failure(li, FAIL_STATUS, comp.status)
                rc = REQ_LINK_FAILED
            elif comp.status != WC_SUCCESS or comp.batch_id != bids[u]:
                status[u] = comp.status if comp.status != WC_SUCCESS else -1
                if rc == REQ_DONE:
                    rc = REQ_REMOTE_ERROR
            else:
                settled[u] = True
        for u in range(posted):
            if settled[u]:
                continue
            li = self.router.used[u]
            core, ops = self.cores[li], self.core_ops[li]
            self.remote_abandoned += 1
            if not ops.abandon(core):
                self.remote_unsure += 1
                self.remote_bound = False  # staging is not safe until Python suspends the link
            if not self.fail_rc[li] and not ops.idle(core):
                # an error completion left it unusable (a verbs QP in error): Python recovers it
                self._note_failure(li, FAIL_STATUS, status[u])
        self.remote_batches += <uint64_t>sent
        self.router._reset()
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

    def get(self, uint64_t key, uint8_t[::1] out):
        """store.get's C path: ``read`` of a page the map holds, or GET_MISS (nothing done, nothing
        counted, ``out`` untouched) when it holds none, so that Python answers the miss (None)."""
        if out.shape[0] != PAGE:
            raise ValueError(f"out must be {PAGE} bytes, got {out.shape[0]}")
        cdef int rc
        with nogil:
            self.store_lock.lock()  # recursive: read_page takes it again, the page cannot go in between
            if (self.map._get(key) & KIND_MASK) == KIND_ABSENT:
                rc = GET_MISS
            else:
                rc = self.read_page(key, &out[0])
            self.store_lock.unlock()
        return rc

    def read_many(self, uint64_t key_base, const uint32_t[::1] pages, uint8_t[::1] out):
        """read_pages of ``key_base | pages[i]`` into ``out`` (4096 bytes a page); the REQ_* outcome."""
        cdef Py_ssize_t n = pages.shape[0]
        if n < 1 or out.shape[0] != n * PAGE:
            raise ValueError(f"{n} pages (at least 1) need out of {n * PAGE} bytes, got {out.shape[0]}")
        cdef int rc
        with nogil:
            rc = self.read_pages(key_base, &pages[0], n, &out[0])
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
        for d, name, last in ((READ, "read", REQ_OUTCOMES), (WRITE, "write", REQ_NO_ROUTE)):  # writes never go remote
            for k in range(last):
                out[f"{name}_{OUTCOMES[k]}"] = self.outcomes[d][k]
        out.update(zero_reads=self.zero_reads, absent_reads=self.absent_reads, zero_writes=self.zero_writes,
                   bytes_in=self.bytes_in, bytes_stored=self.bytes_stored, remote_reads=self.remote_reads,
                   remote_batches=self.remote_batches, remote_abandoned=self.remote_abandoned,
                   remote_unsure=self.remote_unsure)
        return out


REQ = {name: k for k, name in enumerate(OUTCOMES)}
RETIRED_CAPACITY = RETIRED_MAX


cdef object _core_table(core):
    """The PyCapsule of ``core``'s core_ops_t (ext/linkcore.pxd), or None for no core."""
    if core is None:
        return None
    if isinstance(core, WireRequester):
        return _TCP_TABLE
    interface = getattr(core, "c_interface", None)
    if interface is None:
        raise TypeError(f"a link's C core must be a WireRequester, have c_interface() or be None, not {type(core).__name__}")
    table = interface()
    PyCapsule_GetPointer(table, core_ops_capsule())  # raises ValueError on anything else
    return table


_TCP_TABLE = PyCapsule_New(<void *>&TCP_CORE, core_ops_capsule(), NULL)
