# cython: language_level=3
"""userfaultfd(2) for the far-memory frontend: thin calls on (address, length) and page arrays.

The application side creates the fd (``open_uffd``, ``api``, ``register``), keeps a
``Watchdog`` (a C thread, no GIL: it must run while every Python thread is blocked on a
missing page) and installs the fault reporter.  The handler process reads fault messages
(``read_faults``) and resolves them in runs (``copy_pages``, ``writeprotect_pages``,
``punch_pages``).  Every call that can block or loop over pages releases the GIL.

Errors keep the C convention of each call: ``OSError`` with the errno and the operation.
"""
from libc.errno cimport errno, EINTR, EAGAIN, EEXIST, ENOENT
from libc.stdint cimport uint8_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset, strlen
from posix.fcntl cimport open as c_open, O_RDWR, O_CLOEXEC, O_NONBLOCK
from posix.unistd cimport close, read, write, pwrite, pipe, getpid, dup
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from uffd cimport *
from rram._ext._reqpath cimport REQ_DONE, RequestPath

PAGE_SIZE = 4096
FEATURE_PAGEFAULT_FLAG_WP = UFFD_FEATURE_PAGEFAULT_FLAG_WP
FEATURE_MISSING_SHMEM = UFFD_FEATURE_MISSING_SHMEM
FEATURE_MINOR_SHMEM = UFFD_FEATURE_MINOR_SHMEM
FEATURE_WP_SHMEM = UFFD_FEATURE_WP_HUGETLBFS_SHMEM
MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING
MODE_WP = UFFDIO_REGISTER_MODE_WP
MODE_MINOR = UFFDIO_REGISTER_MODE_MINOR
FLAG_MINOR = UFFD_PAGEFAULT_FLAG_MINOR
FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE
FLAG_WP = UFFD_PAGEFAULT_FLAG_WP
#: how the fd was made; kernel-mode faults (a read() into the region) are served only by the first two
FROM_DEVICE = "/dev/userfaultfd"
FROM_SYSCALL = "userfaultfd(2)"
USER_MODE_ONLY = "userfaultfd(2) with UFFD_USER_MODE_ONLY"

cdef enum:
    # Linux >= 6.5 (not in every header yet); older kernels answer EINVAL
    UFFDIO_CONTINUE_MODE_WP = 1 << 1
    PAGE = 4096
    MAX_MSGS = 512
    MAX_REGIONS = 64
    READ_HUP = -100000   # _read_faults: poll reported an error on the userfaultfd
    # serve_faults (the values of ST_* and HISTORY / TREND_HEAVY below)
    S_ABSENT = 0
    S_CLEAN = 1
    S_DIRTY = 2
    S_MARK = 255         # in this batch (a page two threads wait for is served once)
    N_HIST = 33
    HEAVY = 5
    P_HEAD = 0
    P_COUNT = 1
    P_LIMIT = 2
    P_LOW = 3
    K_FAULTS = 0
    K_MISSING = 1
    K_ZERO = 2
    K_WAKEUPS = 3
    K_BATCHES = 4


cdef int _oserror(str op) except -1:
    cdef int err = errno
    import os
    raise OSError(err, f"{op}: {os.strerror(err)}")


def open_uffd():
    """A new non-blocking, close-on-exec userfaultfd: ``(fd, how)``.

    ``/dev/userfaultfd`` first (serves kernel-mode faults without privileges beyond the
    device's permission), then the syscall, then the syscall restricted to user-mode faults.
    ``how`` says which one worked; the reasons the others failed are in ``why``.
    """
    cdef int dev, fd, err_dev, err_sys
    dev = c_open(b"/dev/userfaultfd", O_RDWR | O_CLOEXEC)
    err_dev = errno
    if dev >= 0:
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK)
        err_dev = errno
        close(dev)
        if fd >= 0:
            return fd, FROM_DEVICE, ""
    fd = <int>syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)
    err_sys = errno
    import os
    why = f"/dev/userfaultfd: {os.strerror(err_dev)}"
    if fd >= 0:
        return fd, FROM_SYSCALL, why
    why += f"; userfaultfd(2): {os.strerror(err_sys)} (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE)"
    fd = <int>syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if fd >= 0:
        return fd, USER_MODE_ONLY, why
    raise OSError(errno, f"no userfaultfd available: {why}; user-mode-only: {os.strerror(errno)}")


def api(int fd, uint64_t features):
    """UFFDIO_API handshake asking for ``features``: returns (features offered, ioctls)."""
    cdef uffdio_api a
    a.api = UFFD_API
    a.features = features
    a.ioctls = 0
    if ioctl(fd, UFFDIO_API, &a) < 0:
        _oserror("UFFDIO_API")
    return a.features, a.ioctls


def probe_features():
    """The features this kernel offers (on a throwaway fd; UFFDIO_API can be done once per fd)."""
    fd, how, why = open_uffd()
    try:
        return api(fd, 0)[0], how, why
    finally:
        close(fd)


def register(int fd, uint64_t addr, uint64_t length, uint64_t mode):
    """UFFDIO_REGISTER [addr, addr+length) in ``mode``; returns the ioctls allowed on the range."""
    cdef uffdio_register r
    r.range.start = addr
    r.range.len = length
    r.mode = mode
    r.ioctls = 0
    if ioctl(fd, UFFDIO_REGISTER, &r) < 0:
        _oserror("UFFDIO_REGISTER")
    return r.ioctls


cdef Py_ssize_t _read_faults(int fd, uint64_t *addrs, uint64_t *flags, int cap, int timeout_ms, int other_fd,
                             int spin_us, bint *other_ready) noexcept nogil:
    """read_faults without the GIL: n >= 0 messages, or -errno, or READ_HUP (poll reported an
    error on the userfaultfd)."""
    cdef pollfd pfd[2]
    cdef uffd_msg msgs[MAX_MSGS]
    cdef int nfds = 2 if other_fd >= 0 else 1
    cdef long got
    cdef int rc = 0, i
    cdef Py_ssize_t n = 0
    cdef timespec now
    cdef double deadline
    pfd[0].fd = fd
    pfd[0].events = POLLIN
    pfd[1].fd = other_fd
    pfd[1].events = POLLIN
    pfd[1].revents = 0
    if cap > MAX_MSGS:
        cap = MAX_MSGS
    if spin_us > 0:
        clock_gettime(CLOCK_MONOTONIC, &now)
        deadline = now.tv_sec + now.tv_nsec * 1e-9 + spin_us * 1e-6
        while rc == 0 and now.tv_sec + now.tv_nsec * 1e-9 < deadline:
            rc = poll(pfd, nfds, 0)
            clock_gettime(CLOCK_MONOTONIC, &now)
    while rc == 0 or (rc < 0 and errno == EINTR):
        rc = poll(pfd, nfds, timeout_ms)
        if rc == 0:
            break
    if rc < 0:
        return -errno
    other_ready[0] = nfds == 2 and pfd[1].revents != 0
    if rc > 0 and pfd[0].revents & (POLLERR | POLLHUP):
        return READ_HUP
    if rc > 0 and pfd[0].revents & POLLIN:
        got = read(fd, msgs, cap * sizeof(uffd_msg))
        if got < 0 and errno != EAGAIN and errno != EINTR:
            return -errno
        for i in range(got // <long>sizeof(uffd_msg) if got > 0 else 0):
            if msgs[i].event == UFFD_EVENT_PAGEFAULT:
                addrs[n] = msgs[i].arg.pagefault.address
                flags[n] = msgs[i].arg.pagefault.flags
                n += 1
    return n


cdef int _read_error(Py_ssize_t n) except -1:
    if n == READ_HUP:
        raise OSError(0, "userfaultfd poll reported an error (the region's process is gone?)")
    import os
    raise OSError(-n, f"poll/read(userfaultfd): {os.strerror(-n)}")


def read_faults(int fd, uint64_t[::1] addrs, uint64_t[::1] flags, int timeout_ms, int other_fd=-1, int spin_us=0):
    """Wait up to ``timeout_ms`` for fault messages (GIL released); read up to len(addrs).

    With ``spin_us``, poll without sleeping that long first: a sleeping handler costs the
    faulting thread a cross-CPU wake-up (tens of µs here), a spinning one does not.
    Returns ``(n, other_ready)``: n page faults (address, flags) and whether ``other_fd``
    (the handler's control socket) became readable meanwhile.  Other events are skipped.
    """
    cdef int cap = min(<int>addrs.shape[0], <int>flags.shape[0])
    cdef bint ctl = False
    cdef Py_ssize_t n
    with nogil:
        n = _read_faults(fd, &addrs[0], &flags[0], cap, timeout_ms, other_fd, spin_us, &ctl)
    if n < 0:
        _read_error(n)
    return n, bool(ctl)


# -- the fault loop's common case in C: missing faults on absent pages ------------------------

# page states shared with rram/frontends/farmem/handler.py (one byte a page)
ST_ABSENT = 0
ST_CLEAN = 1
ST_DIRTY = 2
#: serve_faults' counters (uint64 array, added to by C)
C_FAULTS, C_MISSING, C_ZERO, C_WAKEUPS, C_BATCHES = K_FAULTS, K_MISSING, K_ZERO, K_WAKEUPS, K_BATCHES
#: serve_faults' ``pos`` fields (int64 array shared with Python)
POS_HEAD, POS_COUNT, POS_LIMIT, POS_LOW = P_HEAD, P_COUNT, P_LIMIT, P_LOW
#: the page history: HISTORY pages, then how many were ever recorded
HISTORY = N_HIST
#: a delta seen this often among the last HISTORY-1 deltas may make a trend (prefetch.HEAVY)
TREND_HEAVY = HEAVY


cdef struct fault_ctx:
    int fd
    uint64_t base
    Py_ssize_t npages
    uint8_t *state
    const uint8_t *stored
    int64_t *ring
    Py_ssize_t ring_len
    int64_t *pos
    int64_t *hist
    uint64_t *counters
    uint64_t staging
    Py_ssize_t staging_pages
    uint64_t key_base


cdef bint _record(fault_ctx *c, int64_t page) noexcept nogil:
    """Note ``page`` in the history; True when its delta from the last page now occurs HEAVY
    times among the recorded deltas (a trend may be starting: the predictor must see it)."""
    cdef int64_t total = c.hist[N_HIST], k, j, d, seen = 1
    cdef int64_t m = total if total < N_HIST else N_HIST
    if total:
        d = page - c.hist[(total - 1) % N_HIST]
        for k in range(1, m):
            j = total - k  # deltas between recorded pages j-1 and j, newest first
            if c.hist[j % N_HIST] - c.hist[(j - 1) % N_HIST] == d:
                seen += 1
    c.hist[total % N_HIST] = page
    c.hist[N_HIST] = total + 1
    return total > 0 and seen >= HEAVY


cdef int _serve_batch(fault_ctx *c, RequestPath path, const uint64_t *addrs, const uint64_t *flags,
                      Py_ssize_t n, bint *trend) noexcept nogil:
    """Serve ``n`` messages when every one is a missing fault on an ABSENT page and they fit
    under the limit: one read_pages for all, UFFDIO_COPY each (write-protected unless written
    or never stored), states, FIFO ring.  1 when served, 0 when declined with nothing changed
    (the Python path serves them), -errno when an ioctl failed."""
    cdef uint32_t pages[MAX_MSGS]
    cdef uint8_t written[MAX_MSGS]
    cdef Py_ssize_t i, k, m = 0
    cdef uint64_t a, page
    cdef int64_t count = c.pos[P_COUNT], at
    cdef int err = 0
    cdef int64_t copied = 0
    cdef bint wp, ok = True
    for i in range(n):
        a = addrs[i]
        if a < c.base or flags[i] & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR):
            ok = False
            break
        page = (a - c.base) >> 12
        if <Py_ssize_t>page >= c.npages:
            ok = False
            break
        if c.state[page] == S_MARK:
            for k in range(m):
                if pages[k] == page:
                    written[k] |= (flags[i] & UFFD_PAGEFAULT_FLAG_WRITE) != 0
            continue
        if c.state[page] != S_ABSENT:
            ok = False
            break
        c.state[page] = S_MARK
        pages[m] = <uint32_t>page
        written[m] = (flags[i] & UFFD_PAGEFAULT_FLAG_WRITE) != 0
        m += 1
    if ok and (count + m > c.pos[P_LIMIT] or m > c.staging_pages):
        ok = False
    if ok and path.read_pages(c.key_base, pages, m, <uint8_t *>c.staging) != REQ_DONE:
        ok = False
    if not ok:
        for k in range(m):
            c.state[pages[k]] = S_ABSENT
        return 0
    for k in range(m):
        page = pages[k]
        wp = c.stored[page] and not written[k]
        if not c.stored[page]:
            c.counters[K_ZERO] += 1
        err = _copy_run(c.fd, c.base + page * PAGE, c.staging + k * PAGE, PAGE, UFFDIO_COPY_MODE_WP if wp else 0, &copied)
        if err == EEXIST:
            _wake(c.fd, c.base + page * PAGE, PAGE)
            err = 0
        if err:
            for i in range(k, m):
                c.state[pages[i]] = S_ABSENT
            c.pos[P_COUNT] = count
            return -err
        c.state[page] = S_CLEAN if wp else S_DIRTY
        at = (c.pos[P_HEAD] + count) % c.ring_len
        c.ring[at] = page
        count += 1
        if _record(c, page):
            trend[0] = True
    c.pos[P_COUNT] = count
    c.counters[K_FAULTS] += <uint64_t>n
    c.counters[K_MISSING] += <uint64_t>m
    c.counters[K_WAKEUPS] += 1
    return 1


def serve_faults(int fd, uint64_t[::1] addrs, uint64_t[::1] flags, int timeout_ms, int other_fd, int first_spin_us,
                 int spin_us, RequestPath path not None, uint64_t key_base, uint64_t base, uint8_t[::1] state, const uint8_t[::1] stored,
                 int64_t[::1] ring, int64_t[::1] pos, int64_t[::1] hist, uint64_t[::1] counters,
                 uint64_t staging, Py_ssize_t staging_pages):
    """``read_faults``, serving in C (GIL released) every batch of missing faults on ABSENT
    pages that fits under ``pos[POS_LIMIT]`` resident pages: the pages come from the store's
    request path (``path.read_pages``, local pool or remote, one call a batch), are copied in
    write-protected unless written or never ``stored`` (zeros, mapped writable), and join the
    FIFO ``ring`` (``pos``: head, count).  Returns ``(n, other_ready, trend)``: n > 0 messages
    it left for the Python path (anything else: WP and minor faults, pages in other states,
    no room, a request the store's C path declined), or 0 on a timeout, control-socket input,
    a count of resident pages that reached ``pos[POS_LOW]`` (room runs low: Python starts an
    eviction before a batch has to be declined for want of it) or ``trend``: a fault delta
    now repeats often enough that the predictor must look at the ``hist`` of the last pages
    served here.  The first wait spins ``first_spin_us``, the
    ones after a batch served here ``spin_us``.  Counters: see C_*."""
    cdef fault_ctx c
    cdef int cap = min(<int>addrs.shape[0], <int>flags.shape[0])
    cdef bint ctl = False, trend = False
    cdef Py_ssize_t n = 0
    cdef int rc = 1
    if hist.shape[0] < N_HIST + 1 or pos.shape[0] < 4 or counters.shape[0] < 5:
        raise ValueError("serve_faults: hist, pos or counters too short")
    c.fd = fd
    c.base = base
    c.npages = min(state.shape[0], stored.shape[0])
    c.state = &state[0]
    c.stored = &stored[0]
    c.ring = &ring[0]
    c.ring_len = ring.shape[0]
    c.pos = &pos[0]
    c.hist = &hist[0]
    c.counters = &counters[0]
    c.staging = staging
    c.staging_pages = staging_pages
    c.key_base = key_base
    cdef int spin = first_spin_us
    with nogil:
        while True:
            n = _read_faults(fd, &addrs[0], &flags[0], cap, timeout_ms, other_fd, spin, &ctl)
            if n <= 0:
                break
            rc = _serve_batch(&c, path, &addrs[0], &flags[0], n, &trend)
            if rc <= 0 or trend or ctl or c.pos[P_COUNT] >= c.pos[P_LOW]:
                break
            c.counters[K_BATCHES] += 1
            spin = spin_us  # right after work: the next fault may be close
    if n < 0:
        _read_error(n)
    if rc < 0:
        errno = -rc
        _oserror("UFFDIO_COPY")
    return (n if rc == 0 else 0), bool(ctl), bool(trend)


cdef int _copy_run(int fd, uint64_t dst, uint64_t src, uint64_t length, uint64_t mode, int64_t *copied) noexcept nogil:
    """UFFDIO_COPY one run, retrying EAGAIN and partial copies; 0 or the errno."""
    cdef uffdio_copy c
    while length:
        c.dst = dst
        c.src = src
        c.len = length
        c.mode = mode
        c.copy = 0
        if ioctl(fd, UFFDIO_COPY, &c) == 0:
            copied[0] += length
            return 0
        if c.copy > 0:
            copied[0] += c.copy
            dst += c.copy
            src += c.copy
            length -= c.copy
            continue
        if errno == EAGAIN or errno == EINTR:
            continue
        return errno
    return 0


cdef inline void _wake(int fd, uint64_t start, uint64_t length) noexcept nogil:
    cdef uffdio_range r
    r.start = start
    r.len = length
    ioctl(fd, UFFDIO_WAKE, &r)


def copy_pages(int fd, uint64_t[::1] dsts, uint64_t src, Py_ssize_t n, bint wp):
    """Fill page ``dsts[i]`` from ``src + i*4096`` by UFFDIO_COPY, one ioctl per run of
    contiguous destinations, write-protected when ``wp``.  Pages already present (EEXIST:
    a race with another fill) are skipped and woken: a thread waiting on a page always wakes.
    Returns the pages copied."""
    cdef Py_ssize_t i = 0, j, k
    cdef int err = 0
    cdef int64_t copied = 0
    cdef uint64_t mode = UFFDIO_COPY_MODE_WP if wp else 0
    with nogil:
        while i < n:
            j = i + 1
            while j < n and dsts[j] == dsts[j - 1] + PAGE:
                j += 1
            err = _copy_run(fd, dsts[i], src + i * PAGE, (j - i) * PAGE, mode, &copied)
            if err == EEXIST:  # part of the run is present: page by page, skipping those
                err = 0
                copied = copied - copied % PAGE
                for k in range(i, j):
                    err = _copy_run(fd, dsts[k], src + k * PAGE, PAGE, mode, &copied)
                    if err == EEXIST:
                        _wake(fd, dsts[k], PAGE)
                        err = 0
                    elif err:
                        break
            if err:
                break
            i = j
    if err:
        errno = err
        _oserror("UFFDIO_COPY")
    return copied // PAGE


def writeprotect_pages(int fd, uint64_t[::1] addrs, Py_ssize_t n, bint protect, bint wake=True):
    """UFFDIO_WRITEPROTECT (protect) or un-protect the pages at ``addrs`` (sorted), per run."""
    cdef int err
    # protecting never wakes, and the kernel refuses WP together with DONTWAKE
    cdef uint64_t mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else (0 if wake else UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    with nogil:
        err = _range_ioctl(fd, UFFDIO_WRITEPROTECT, n, addrs, mode)
    if err:
        errno = err
        _oserror("UFFDIO_WRITEPROTECT")


cdef int _range_ioctl(int fd, unsigned long request, Py_ssize_t n, uint64_t[::1] addrs, uint64_t mode) noexcept nogil:
    """One range ioctl (WAKE, CONTINUE, WRITEPROTECT) per run of contiguous pages; EEXIST
    (already mapped) is not an error, and the pages concerned are woken.  0 or the errno."""
    cdef Py_ssize_t i = 0, j, k
    cdef uffdio_writeprotect w
    cdef uffdio_continue c
    cdef uffdio_range r
    cdef int rc
    while i < n:
        j = i + 1
        while j < n and addrs[j] == addrs[j - 1] + PAGE:
            j += 1
        if request == UFFDIO_WAKE:
            r.start = addrs[i]
            r.len = (j - i) * PAGE
            rc = ioctl(fd, UFFDIO_WAKE, &r)
        elif request == UFFDIO_CONTINUE:
            c.range.start = addrs[i]
            c.range.len = (j - i) * PAGE
            c.mode = mode
            c.mapped = 0
            rc = ioctl(fd, UFFDIO_CONTINUE, &c)
            if rc < 0 and c.mapped > 0 and c.mapped < (j - i) * PAGE:
                continue  # partial: the retry meets EEXIST and goes page by page below
        else:
            w.range.start = addrs[i]
            w.range.len = (j - i) * PAGE
            w.mode = mode
            rc = ioctl(fd, UFFDIO_WRITEPROTECT, &w)
        if rc < 0 and (errno == EAGAIN or errno == EINTR):
            continue
        if rc < 0 and errno == EEXIST and request == UFFDIO_CONTINUE and j - i > 1:
            # part of the run is mapped already: page by page
            for k in range(i, j):
                c.range.start = addrs[k]
                c.range.len = PAGE
                c.mode = mode
                while ioctl(fd, UFFDIO_CONTINUE, &c) < 0:
                    if errno == EEXIST:
                        _wake(fd, addrs[k], PAGE)
                        break
                    if errno != EAGAIN and errno != EINTR:
                        return errno
            rc = 0
        elif rc < 0 and errno == EEXIST:
            _wake(fd, addrs[i], (j - i) * PAGE)
            rc = 0
        if rc < 0:
            return errno
        i = j
    return 0


def wake_pages(int fd, uint64_t[::1] addrs, Py_ssize_t n):
    """UFFDIO_WAKE the pages at ``addrs`` (sorted), one ioctl per run."""
    cdef int err
    with nogil:
        err = _range_ioctl(fd, UFFDIO_WAKE, n, addrs, 0)
    if err:
        errno = err
        _oserror("UFFDIO_WAKE")


def continue_pages(int fd, uint64_t[::1] addrs, Py_ssize_t n, bint wp=False):
    """UFFDIO_CONTINUE: map pages already in the memfd's page cache (minor faults), per run;
    write-protected when ``wp`` (Linux >= 6.5, else EINVAL)."""
    cdef int err
    cdef uint64_t mode = UFFDIO_CONTINUE_MODE_WP if wp else 0
    with nogil:
        err = _range_ioctl(fd, UFFDIO_CONTINUE, n, addrs, mode)
    if err:
        errno = err
        _oserror("UFFDIO_CONTINUE")


def zeropage(int fd, uint64_t addr, uint64_t length, bint wake=True):
    """UFFDIO_ZEROPAGE [addr, addr+length): zero pages, mapped writable (no write-protect mode)."""
    cdef uffdio_zeropage z
    cdef int rc
    while True:
        z.range.start = addr
        z.range.len = length
        z.mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE
        z.zeropage = 0
        with nogil:
            rc = ioctl(fd, UFFDIO_ZEROPAGE, &z)
        if rc == 0 or errno != EAGAIN:
            break
    if rc < 0:
        _oserror("UFFDIO_ZEROPAGE")


def wake(int fd, uint64_t addr, uint64_t length):
    """UFFDIO_WAKE: let threads blocked on [addr, addr+length) retry their access."""
    cdef uffdio_range r
    r.start = addr
    r.len = length
    if ioctl(fd, UFFDIO_WAKE, &r) < 0:
        _oserror("UFFDIO_WAKE")


def punch_pages(int memfd, uint64_t[::1] offsets, Py_ssize_t n):
    """fallocate(PUNCH_HOLE) the pages at byte ``offsets`` of a memfd, one call per run: the
    pages leave every mapping, and the next touch in a registered range faults as missing."""
    cdef Py_ssize_t i = 0, j
    cdef int rc = 0
    with nogil:
        while i < n:
            j = i + 1
            while j < n and offsets[j] == offsets[j - 1] + PAGE:
                j += 1
            rc = fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offsets[i], (j - i) * PAGE)
            if rc < 0 and errno == EINTR:
                continue
            if rc < 0:
                break
            i = j
    if rc < 0:
        _oserror("fallocate(PUNCH_HOLE)")


def gather_pages(uint64_t base, uint64_t[::1] offsets, Py_ssize_t n, uint64_t out):
    """Copy the pages at ``base + offsets[i]`` to ``out + i*4096`` (GIL released)."""
    cdef Py_ssize_t i
    with nogil:
        for i in range(n):
            memcpy(<void *>(out + i * PAGE), <void *>(base + offsets[i]), PAGE)


def write_pages(int memfd, uint64_t[::1] offsets, Py_ssize_t n, uint64_t src):
    """pwrite ``src + i*4096`` to byte ``offsets[i]`` of a memfd, one call per run (GIL
    released): fills its page cache without a page fault per page in our own mapping."""
    cdef Py_ssize_t i = 0, j
    cdef long done, rc = 0
    with nogil:
        while i < n:
            j = i + 1
            while j < n and offsets[j] == offsets[j - 1] + PAGE:
                j += 1
            done = 0
            while done < (j - i) * PAGE:
                rc = pwrite(memfd, <void *>(src + i * PAGE + done), (j - i) * PAGE - done, offsets[i] + done)
                if rc < 0 and errno == EINTR:
                    continue
                if rc < 0:
                    break
                done += rc
            if rc < 0:
                break
            i = j
    if rc < 0:
        _oserror("pwrite(memfd)")


# -- loud failure: a watchdog thread and a fault reporter, both C, neither needs the GIL ------

cdef struct region_t:
    uint64_t addr
    uint64_t length
    int used
    int failed
    int owner_pid
    char name[64]
    char reason[200]

cdef region_t _regions[MAX_REGIONS]
cdef sigaction_t _old_segv, _old_bus
cdef bint _reporter_installed = False


cdef void _put(char *buf, size_t *at, const char *s) noexcept nogil:
    cdef size_t n = strlen(s)
    if at[0] + n >= 511:
        n = 510 - at[0]
    memcpy(buf + at[0], s, n)
    at[0] += n


cdef void _put_hex(char *buf, size_t *at, uint64_t v) noexcept nogil:
    cdef char tmp[19]
    cdef const char *digits = b"0123456789abcdef"
    cdef int i
    tmp[0] = 48  # '0'
    tmp[1] = 120  # 'x'
    for i in range(16):
        tmp[17 - i] = digits[v & 15]
        v >>= 4
    tmp[18] = 0
    _put(buf, at, tmp)


cdef void _on_fault(int sig, siginfo_t *info, void *ctx) noexcept nogil:
    # async-signal-safe only: explain a fault inside a far-memory region on stderr, then put
    # the previous disposition back; the access faults again and that handler (faulthandler's
    # traceback, or the default core dump) runs.
    cdef uint64_t a = <uint64_t>info.si_addr
    cdef char msg[512]
    cdef size_t at = 0
    cdef int i
    for i in range(MAX_REGIONS):
        if _regions[i].used and _regions[i].addr <= a < _regions[i].addr + _regions[i].length:
            _put(msg, &at, b"rram FarMemory: access to ")
            _put_hex(msg, &at, a)
            _put(msg, &at, b" in region '")
            _put(msg, &at, _regions[i].name)
            _put(msg, &at, b"' failed: ")
            if getpid() != _regions[i].owner_pid:
                _put(msg, &at, b"the region is not inherited by a forked child (MADV_DONTFORK); open regions after fork()")
            elif _regions[i].failed:
                _put(msg, &at, _regions[i].reason)
            else:
                _put(msg, &at, b"unexpected fault while its handler is alive")
            _put(msg, &at, b"\n")
            write(2, msg, at)
            break
    sigaction(sig, &_old_segv if sig == SIGSEGV else &_old_bus, NULL)


def install_fault_reporter():
    """Install (once) the SIGSEGV/SIGBUS handler that names the region and the reason."""
    global _reporter_installed
    cdef sigaction_t sa
    if _reporter_installed:
        return
    memset(&sa, 0, sizeof(sa))
    sa.sa_sigaction = _on_fault
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER
    sigemptyset(&sa.sa_mask)
    if sigaction(SIGSEGV, &sa, &_old_segv) < 0 or sigaction(SIGBUS, &sa, &_old_bus) < 0:
        _oserror("sigaction")
    _reporter_installed = True


cdef struct watch_t:
    int lifeline      # readable when the handler writes a reason, hung up when it dies
    int stop_r        # our stop pipe
    int uffd          # the application's own reference to the userfaultfd
    int slot
    int fired


cdef void *_watch(void *arg) noexcept nogil:
    cdef watch_t *w = <watch_t *>arg
    cdef pollfd pfd[2]
    cdef region_t *r = &_regions[w.slot]
    cdef long got
    cdef const char *dead = b"its handler process exited (killed, or lost its page store)"
    pfd[0].fd = w.lifeline
    pfd[0].events = POLLIN | POLLRDHUP
    pfd[1].fd = w.stop_r
    pfd[1].events = POLLIN
    while True:
        if poll(pfd, 2, -1) < 0:
            if errno == EINTR:
                continue
            break
        if pfd[1].revents:
            return NULL
        if pfd[0].revents:
            break
    if not r.failed:  # else a close already gave the reason
        got = read(w.lifeline, r.reason, sizeof(r.reason) - 1)
        if got <= 0:
            memcpy(r.reason, dead, strlen(dead) + 1)
        else:
            r.reason[got] = 0
        r.failed = 1
    # PROT_NONE before the last reference to the uffd goes: blocked threads then retry into
    # SIGSEGV (reported by _on_fault) instead of falling back to anonymous zero pages
    mprotect(<void *>r.addr, r.length, PROT_NONE)
    close(w.uffd)
    w.uffd = -1
    w.fired = 1
    return NULL


cdef class Watchdog:
    """Watches a region's handler through ``lifeline`` (the read end of a pipe whose write
    end only the handler holds).  On a reason written there, or on hang-up, it makes the
    region PROT_NONE and drops ``uffd`` (a dup it owns), so faulting threads get SIGSEGV
    with a message instead of hanging or reading zeros.  A C thread: it runs while every
    Python thread of the process is blocked on a missing page."""
    cdef watch_t w
    cdef int stop_w
    cdef pthread_t thread
    cdef bint running

    def __cinit__(self, int lifeline, int uffd, uint64_t addr, uint64_t length, str name):
        cdef int fds[2]
        cdef int i, slot = -1
        self.running = False
        self.stop_w = -1
        self.w.uffd = -1
        self.w.lifeline = -1
        for i in range(MAX_REGIONS):
            if not _regions[i].used:
                slot = i
                break
        if slot < 0:
            raise OSError(0, f"more than {MAX_REGIONS} far-memory regions in one process")
        if pipe(fds) < 0:
            _oserror("pipe")
        bname = name.encode()[:63]
        memset(&_regions[slot], 0, sizeof(region_t))
        memcpy(_regions[slot].name, <char *>bname, len(bname))
        _regions[slot].addr = addr
        _regions[slot].length = length
        _regions[slot].owner_pid = getpid()
        _regions[slot].used = 1
        self.w.lifeline = lifeline
        self.w.uffd = uffd
        self.w.stop_r = fds[0]
        self.w.slot = slot
        self.w.fired = 0
        self.stop_w = fds[1]
        if pthread_create(&self.thread, NULL, _watch, &self.w) != 0:
            _regions[slot].used = 0
            close(fds[0])
            close(fds[1])
            raise OSError(0, "pthread_create failed")
        self.running = True

    @property
    def failed(self):
        return bool(_regions[self.w.slot].failed)

    @property
    def reason(self):
        return _regions[self.w.slot].reason.decode(errors="replace") if self.failed else ""

    def retire(self, str reason):
        """A normal close begins: from now on the region is PROT_NONE and a touch reports
        ``reason``.  The handler may be stopped after this without anyone reading zeros."""
        cdef region_t *r = &_regions[self.w.slot]
        if not self.running or r.failed:
            return
        b = reason.encode()[:sizeof(r.reason) - 1]
        memcpy(r.reason, <char *>b, len(b))
        r.reason[len(b)] = 0
        r.failed = 1
        if mprotect(<void *>r.addr, r.length, PROT_NONE) < 0:
            _oserror("mprotect(PROT_NONE)")

    def stop(self):
        """Stop watching; idempotent.  Closes the uffd reference it owns.  The fault reporter
        keeps knowing the region until ``release``."""
        cdef char c = 120
        if not self.running:
            return
        write(self.stop_w, &c, 1)
        with nogil:
            pthread_join(self.thread, NULL)
        self.running = False
        close(self.stop_w)
        close(self.w.stop_r)
        close(self.w.lifeline)
        if self.w.uffd >= 0:
            close(self.w.uffd)
            self.w.uffd = -1

    def release(self):
        """The region is unmapped: forget it in the fault reporter."""
        self.stop()
        _regions[self.w.slot].used = 0

    def __dealloc__(self):
        self.stop()
