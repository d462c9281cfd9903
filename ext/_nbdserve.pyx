# cython: language_level=3
"""An NBD connection's common case in C: receive, parse, serve one request, reply, repeat.

The kernel's swap I/O is mostly single READs and WRITEs of a few 4 KiB blocks (most often one),
one at a time.  ``serve_loop`` runs the connection while that lasts, without the GIL and without a Python object per request:
recv (polling for a while first when that pays, then sleeping: LoopState), parse with
_nbdwire.RequestRun, serve the blocks through the store's RequestPath (ext/_reqpath.pyx), pack
the reply and send it.  It returns to
the Python server (rram/frontends/nbd/server.py) as soon as something needs Python: a run of
several requests (one batched store call), a request the request path declined (a remote page
it could not read, a full local pool, ...: nothing was changed or sent), any other command or a protocol error
(the sans-IO parser answers those), the peer closing, or a request bigger than the buffer.
"""
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from rram._ext._nbdwire cimport RequestRun
from rram._ext._reqpath cimport REQ_DONE, RequestPath

import os


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT

cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)


cdef enum:
    PAGE = 4096
    CMD_READ = 0
    CMD_WRITE = 1
    REQUEST_SIZE = 28
    REQUEST_MAGIC = 0x25609513

# why serve_loop returned
cdef enum:
    RUN = 0         # ``run`` holds several requests, for the batch path
    DECLINED = 1    # ``run`` holds one request the request path declined: serve it in Python
    PARSER = 2      # the buffer's head is for the Python parser (another command, an error, ...)
    EOF = 3         # the peer closed the connection

LOOP_RUN, LOOP_DECLINED, LOOP_PARSER, LOOP_EOF = RUN, DECLINED, PARSER, EOF

# the adaptive spin (LoopState)
cdef enum:
    SCORE_MAX = 16      # hits banked: a burst of 4 misses does not stop the spin
    MISS_COST = 4       # a miss takes this many hits back: spinning stays on above ~80 % hits
    PROBE_FIRST = 8     # waits between probes once the spin is off; doubles per failed probe
    PROBE_MAX = 1024    # ... up to this (a probe costs one spin of the cap: ~0.1 % of the waits)
    PREEMPT_NS = 10000  # a step of the poll loop this long: the thread was descheduled, so the
                        # request that came meanwhile says nothing about polling


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline uint32_t rd32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return be32toh(v)


cdef int send_all(int fd, const uint8_t *buf, size_t n) noexcept nogil:
    """Send n bytes on a blocking socket: 0, or the errno."""
    cdef ssize_t r
    while n:
        r = send(fd, buf, n, MSG_NOSIGNAL)
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        buf += r
        n -= <size_t>r
    return 0


cdef class LoopState:
    """One connection's state across serve_loop calls: its spin policy and its counters.

    Polling the socket after a reply catches a qd1 client's next request without a wake-up
    (30-70 us across CPUs here), but the poll holds a CPU: when the client needs that same CPU
    to send the request (nbdfuse pinned with the server, not preempting the poll), or simply
    takes longer than the cap, every poll is lost time.  So the spin runs only while it pays.
    Each wait for a new request is a hit (the request came while polling), a miss (the poll ran
    out) or neither (the thread was descheduled meanwhile: the CPU was someone else's, the
    request came without our poll; a loaded machine does that to any poll).  A hit banks one
    point (up to SCORE_MAX), a miss costs MISS_COST; below zero the spin stops and the
    connection sleeps in recv at once (one syscall).  While stopped, every ``probe_gap``-th wait
    polls for the cap once: a hit turns the spin on again (with half the points banked), a miss
    doubles the gap (up to PROBE_MAX), neither tries again after the same gap.  A spin turned
    on by a probe must bank all its points before it stops again, or the gap doubles as for a
    missed probe; once it has, the gap is back to PROBE_FIRST.  So a hit rate just under the
    threshold does not switch it on and off every few waits.  ``cap_ns`` 0 never polls; ``adaptive`` False polls for the cap
    on every wait (the fixed spin).  No timing is measured but the poll's own steps.
    """
    cdef readonly int64_t cap_ns
    cdef readonly bint adaptive, on
    cdef readonly int score, probe_gap, until_probe
    cdef bint probing, proven
    # counters, read by Python while C runs (torn reads of a statistic do not matter)
    cdef readonly uint64_t served, declined, hits, misses, preempted, probes, spun_ns, sleeps

    def __init__(self, int64_t cap_ns, bint adaptive=True):
        if cap_ns < 0:
            raise ValueError(f"spin cap must be >= 0 ns, got {cap_ns}")
        self.cap_ns = cap_ns
        self.adaptive = adaptive
        self.on = cap_ns > 0
        self.score = 0
        self.probe_gap = PROBE_FIRST
        self.until_probe = 0
        self.probing = False
        self.proven = True

    cdef int64_t _budget(self) noexcept nogil:
        """The poll budget of the next wait for a new request (a probe's when one is due)."""
        self.probing = False
        if self.cap_ns == 0 or self.on or not self.adaptive:
            return self.cap_ns
        self.until_probe -= 1
        if self.until_probe > 0:
            return 0
        self.probing = True
        self.probes += 1
        return self.cap_ns

    cdef void _observe(self, bint caught, bint preempted) noexcept nogil:
        """The outcome of a wait that polled: ``caught`` the request while polling, having been
        ``preempted`` (descheduled) meanwhile."""
        cdef bint hit = caught and not preempted
        if caught and preempted:  # says nothing: a probe tries again after the same gap
            self.preempted += 1
            if self.probing and self.adaptive:
                self.probing = False
                self.until_probe = self.probe_gap
            return
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        if not self.adaptive:
            return
        if self.probing:
            self.probing = False
            if hit:
                self.on = True
                self.score = SCORE_MAX // 2
                self.proven = False
            else:
                self.probe_gap = min(2 * self.probe_gap, PROBE_MAX)
                self.until_probe = self.probe_gap
            return
        if hit:
            self.score = min(self.score + 1, SCORE_MAX)
            if self.score == SCORE_MAX:
                self.proven = True
                self.probe_gap = PROBE_FIRST
            return
        self.score -= MISS_COST
        if self.score < 0:
            self.on = False
            self.score = 0
            if not self.proven:  # the probe's hit was luck: as good as a missed probe
                self.probe_gap = min(2 * self.probe_gap, PROBE_MAX)
            self.until_probe = self.probe_gap

    def next_budget_ns(self):
        """The next wait's poll budget, as serve_loop takes it (advances the probe count): tests."""
        return self._budget()

    def observe(self, bint caught, bint preempted=False):
        """Record a polled wait's outcome, as serve_loop does: tests."""
        self._observe(caught, preempted)

    def counters(self):
        return {"c_requests": self.served, "c_declined": self.declined, "spin_hits": self.hits,
                "spin_misses": self.misses, "spin_preempted": self.preempted, "spin_probes": self.probes, "spin_us": self.spun_ns // 1000,
                "sleeps": self.sleeps}


cdef int serve_one(RequestRun run, RequestPath path, uint64_t key_base, int fd, int *err) noexcept nogil:
    """Serve the run's one request (its blocks in order) and send its reply: REQ_DONE, or the
    request path's reason not to, with nothing sent.  A WRITE declined at block k has stored
    blocks 0..k-1 already; the Python path then stores the whole request again, the same bytes,
    before anything is acknowledged.  ``err``: the send's errno, 0 when sent."""
    cdef int rc = REQ_DONE, i
    cdef Py_ssize_t hsz
    err[0] = 0
    if run.command == CMD_READ:
        hsz = run._read_header(&run._out[0], 0)
        rc = path.read_pages(key_base, &run._pages[0], run.npages, &run._out[hsz])  # remote pages too
        if rc != REQ_DONE:
            return rc
        err[0] = send_all(fd, &run._out[0], hsz + run.npages * PAGE)
    else:
        for i in range(run.npages):
            rc = path.write_page(key_base | run._pages[i], &run._data[i * PAGE])
            if rc != REQ_DONE:
                return rc
        run._simple_reply(&run._out[0], run._handles[0])
        err[0] = send_all(fd, &run._out[0], 16)
    return rc


cdef bint wants_more(const uint8_t *head, Py_ssize_t have, Py_ssize_t room, uint32_t max_block) noexcept nogil:
    """Whether the bytes at the buffer's head are the start of a request worth receiving more of
    here: a header not complete yet, or a WRITE whose payload is still coming and fits."""
    cdef uint32_t length
    if have < REQUEST_SIZE:
        return True
    cdef uint16_t cmd
    memcpy(&cmd, head + 6, 2)
    if rd32(head) != REQUEST_MAGIC or be16toh(cmd) != CMD_WRITE:
        return False
    length = rd32(head + 24)
    return length <= max_block and REQUEST_SIZE + <Py_ssize_t>length <= room and have < REQUEST_SIZE + length


cdef ssize_t wait_recv(LoopState st, int fd, uint8_t *dst, size_t room, bint fresh) noexcept nogil:
    """recv into ``dst``: poll for the spin budget, then sleep.  ``fresh``: waiting for a new
    request (the spin policy learns from those; a WRITE's payload still coming only polls
    while the spin is on).  recv's result (errno set when < 0)."""
    cdef int64_t budget = st._budget() if fresh else (st.cap_ns if st.on or not st.adaptive else 0)
    cdef int64_t t0, t, last, deadline
    cdef bint preempted = False
    cdef ssize_t got
    if budget:
        t0 = last = now_ns()
        deadline = t0 + budget
        while True:  # the next request usually follows the reply within microseconds
            got = recv(fd, dst, room, MSG_DONTWAIT)
            if got >= 0 or (errno != EAGAIN and errno != EINTR):
                break
            t = now_ns()
            if t - last > PREEMPT_NS:
                preempted = True
            last = t
            if t >= deadline:
                break
        st.spun_ns += <uint64_t>(last - t0)
        if fresh:
            st._observe(got >= 0, preempted)
        if got >= 0 or (errno != EAGAIN and errno != EINTR):
            return got
    st.sleeps += 1
    got = recv(fd, dst, room, 0)
    while got < 0 and errno == EINTR:
        got = recv(fd, dst, room, 0)
    return got


def serve_loop(RequestRun run, RequestPath path, uint64_t key_base, int fd, uint8_t[::1] buf,
               Py_ssize_t start, Py_ssize_t end, uint64_t export_size, uint32_t max_block, uint32_t min_block,
               LoopState state not None):
    """Serve single requests from ``buf[start:end]`` and the socket ``fd`` (blocking) until
    something needs Python.  Returns (start, end, why): the buffer's new bounds (data may have
    moved to the front) and LOOP_*; ``state`` counts what C served and declined (live: Python
    reads it while C waits).  A request is served here when the parser takes it alone (whole
    4 KiB blocks, no flag but FUA).  Between requests it polls the socket as ``state``'s spin
    policy says, then sleeps in recv.  Raises OSError when the socket fails."""
    if run.nreq:
        raise ValueError("serve_loop needs an empty run")
    if start < 0 or end > buf.shape[0] or start > end:
        raise ValueError(f"bad buffer range {start}..{end} of {buf.shape[0]}")
    cdef Py_ssize_t cap = buf.shape[0]
    cdef ssize_t got
    cdef int rc, err = 0, why = -1
    cdef uint8_t *b = &buf[0]
    with nogil:
        while True:
            start = run._parse(b, start, end, export_size, max_block, min_block)
            if run.nreq == 1:
                rc = serve_one(run, path, key_base, fd, &err)
                if err:
                    break
                if rc != REQ_DONE:
                    state.declined += 1
                    why = DECLINED
                    break
                state.served += 1
                run._clear()
                continue
            if run.nreq:
                why = RUN
                break
            if not wants_more(b + start, end - start, cap, max_block):
                why = PARSER
                break
            if start:  # move the partial request to the front: room for the rest of it
                memmove(b, b + start, end - start)
                end -= start
                start = 0
            got = wait_recv(state, fd, b + end, cap - end, start == end)
            if got < 0:
                err = errno
                break
            if got == 0:
                why = EOF
                break
            end += got
    if err:
        raise OSError(err, os.strerror(err))
    return start, end, why
