# cython: language_level=3
"""An NBD connection's common case in C: receive, parse, serve the requests, reply, repeat.

The kernel's swap I/O is mostly single READs and WRITEs of a few 4 KiB blocks (most often one),
one at a time; a client with a deep queue (fio at qd32, a swap burst) sends runs of them back
to back.  ``serve_loop`` runs the connection while that lasts, without the GIL and without a
Python object per request: recv (polling for a while first when that pays, then sleeping:
LoopState), parse with _nbdwire.RequestRun (the run of READs, or of WRITEs, at the buffer's
head), serve its blocks through the store's RequestPath (ext/_reqpath.pyx: a run's READs in
one read_pages, so its remote pages share round trips), pack the replies and send them at once.
It returns to the Python server (rram/frontends/nbd/server.py) as soon as something needs
Python: a request the request path declined (a remote page it could not read, a full local
pool, ...: nothing of it was changed or sent; the requests of its run before it were served
and answered, the rest are left in ``run`` for Python), any other command or a protocol error
(the sans-IO parser answers those), the peer closing, or a request bigger than the buffer.
"""
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from rram._ext._nbdwire cimport RequestRun
from rram._ext._reqpath cimport REQ_DONE, RequestPath
from spin cimport (
    SPIN_PREEMPT_NS, spin_budget, spin_counters, spin_init, spin_observe, spin_observe_request, spin_steady_budget,
    spin_t,
)

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
    RUN = 0         # ``run`` holds several requests, the first declined: for the batch path
    DECLINED = 1    # ``run`` holds one request the request path declined: serve it in Python
    PARSER = 2      # the buffer's head is for the Python parser (another command, an error, ...)
    EOF = 3         # the peer closed the connection

LOOP_RUN, LOOP_DECLINED, LOOP_PARSER, LOOP_EOF = RUN, DECLINED, PARSER, EOF

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
    takes longer than the cap, every poll is lost time.  So the spin runs only while it pays:
    the adaptive spin of ext/spin.pxd (which the tcp requester's completion wait shares), fed
    with each wait for a new request.  ``cap_ns`` 0 never polls; ``adaptive`` False polls for
    the cap on every wait (the fixed spin).
    """
    cdef spin_t spin
    # counters, read by Python while C runs (torn reads of a statistic do not matter):
    # single requests served and declined; runs of several served whole, requests of runs
    # served (those before a decline too), runs declined part way (the rest went to Python)
    cdef readonly uint64_t served, declined, runs, run_requests, run_declined

    def __init__(self, int64_t cap_ns, bint adaptive=True):
        if cap_ns < 0:
            raise ValueError(f"spin cap must be >= 0 ns, got {cap_ns}")
        spin_init(&self.spin, cap_ns, adaptive)

    @property
    def cap_ns(self):
        return self.spin.cap_ns

    @property
    def adaptive(self):
        return bool(self.spin.adaptive)

    @property
    def on(self):
        return bool(self.spin.on)

    @property
    def score(self):
        return self.spin.score

    @property
    def probe_gap(self):
        return self.spin.probe_gap

    @property
    def until_probe(self):
        return self.spin.until_probe

    @property
    def hits(self):
        return self.spin.hits

    @property
    def misses(self):
        return self.spin.misses

    @property
    def preempted(self):
        return self.spin.preempted

    @property
    def idle(self):
        return self.spin.idle

    @property
    def probes(self):
        return self.spin.probes

    @property
    def sleeps(self):
        return self.spin.sleeps

    def next_budget_ns(self):
        """The next wait's poll budget, as serve_loop takes it (advances the probe count): tests."""
        return spin_budget(&self.spin)

    def observe(self, bint caught, bint preempted=False, int64_t waited_ns=0, bint polled=True):
        """Record a wait's outcome, as serve_loop does: tests.  Not ``caught``: the request came
        ``waited_ns`` after the wait began, its poll having run out (``polled``) or no budget."""
        if caught:
            spin_observe(&self.spin, True, preempted)
        else:
            spin_observe_request(&self.spin, polled, preempted, waited_ns)

    def counters(self):
        c = {"c_requests": self.served, "c_declined": self.declined, "c_runs": self.runs,
             "c_run_requests": self.run_requests, "c_run_declined": self.run_declined, "sleeps": self.spin.sleeps}
        c.update(spin_counters(&self.spin, "spin_"))
        return c


cdef int serve_run(RequestRun run, RequestPath path, uint64_t key_base, int fd, int *served, int *err) noexcept nogil:
    """Serve the run's requests in order and send the replies of those served, in one send:
    REQ_DONE when all were, else the request path's reason to decline request ``served[0]``
    (nothing of it sent; the ones before it were served and answered).  READs: every page of
    the run in one read_pages (one lock, a remote batch per link per CHUNK pages), so one that
    declines leaves the whole run to Python.  WRITEs: page by page; a WRITE declined at block
    k has stored blocks 0..k-1 already, and the Python path then stores the whole request
    again, the same bytes, before anything is acknowledged.  ``err``: the send's errno, 0 when
    sent (or nothing to send)."""
    cdef int rc = REQ_DONE, k = 0
    cdef Py_ssize_t size = 0, page = 0, hsz, end
    err[0] = 0
    if run.command == CMD_READ:
        if run.nreq == 1:  # the common case: the pages go straight behind the header
            hsz = run._read_header(&run._out[0], 0)
            rc = path.read_pages(key_base, &run._pages[0], run.npages, &run._out[hsz])
            size = hsz + run.npages * PAGE
        else:
            rc = path.read_pages(key_base, &run._pages[0], run.npages, &run._data[0])
            size = run._read_replies()
        if rc == REQ_DONE:
            k = run.nreq
        else:
            size = 0
    else:
        while k < run.nreq:
            end = page + run._lengths[k] // PAGE
            while page < end:
                rc = path.write_page(key_base | run._pages[page], &run._data[page * PAGE])
                if rc != REQ_DONE:
                    break
                page += 1
            if rc != REQ_DONE:
                break
            k += 1
        size = run._write_replies(k)
    served[0] = k
    if size:
        err[0] = send_all(fd, &run._out[0], size)
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
    cdef spin_t *sp = &st.spin
    cdef int64_t budget = spin_budget(sp) if fresh else spin_steady_budget(sp)
    cdef int64_t t0 = now_ns() if fresh or budget else 0  # (a fresh wait's length tells idle)
    cdef int64_t t, last = t0, deadline
    cdef bint preempted = False
    cdef ssize_t got
    if budget:
        deadline = t0 + budget
        while True:  # the next request usually follows the reply within microseconds
            got = recv(fd, dst, room, MSG_DONTWAIT)
            if got >= 0 or (errno != EAGAIN and errno != EINTR):
                break
            t = now_ns()
            if t - last > SPIN_PREEMPT_NS:
                preempted = True
            last = t
            if t >= deadline:
                break
        sp.spun_ns += <uint64_t>(last - t0)
        if got >= 0 or (errno != EAGAIN and errno != EINTR):
            if fresh:
                spin_observe(sp, got >= 0, preempted)
            return got
    sp.sleeps += 1
    got = recv(fd, dst, room, 0)
    while got < 0 and errno == EINTR:
        got = recv(fd, dst, room, 0)
    if fresh:  # a miss, idle (the client paused: ext/spin.pxd) or neither
        spin_observe_request(sp, budget > 0, preempted, now_ns() - t0)
    return got


def serve_loop(RequestRun run, RequestPath path, uint64_t key_base, int fd, uint8_t[::1] buf,
               Py_ssize_t start, Py_ssize_t end, uint64_t export_size, uint32_t max_block, uint32_t min_block,
               LoopState state not None):
    """Serve requests from ``buf[start:end]`` and the socket ``fd`` (blocking) until something
    needs Python.  Returns (start, end, why): the buffer's new bounds (data may have moved to
    the front) and LOOP_*; ``state`` counts what C served and declined (live: Python reads it
    while C waits).  Requests are served here when the parser takes them (whole 4 KiB blocks,
    no flag but FUA), alone or as a run.  Between requests it polls the socket as ``state``'s
    spin policy says, then sleeps in recv.  Raises OSError when the socket fails."""
    if run.nreq:
        raise ValueError("serve_loop needs an empty run")
    if start < 0 or end > buf.shape[0] or start > end:
        raise ValueError(f"bad buffer range {start}..{end} of {buf.shape[0]}")
    cdef Py_ssize_t cap = buf.shape[0]
    cdef ssize_t got
    cdef int rc, err = 0, why = -1, nreq, served = 0
    cdef uint8_t *b = &buf[0]
    with nogil:
        while True:
            start = run._parse(b, start, end, export_size, max_block, min_block)
            if run.nreq:
                nreq = run.nreq
                rc = serve_run(run, path, key_base, fd, &served, &err)
                if err:
                    break
                if nreq == 1:
                    state.served += served
                    state.declined += rc != REQ_DONE
                else:
                    state.run_requests += served
                    state.runs += rc == REQ_DONE
                    state.run_declined += rc != REQ_DONE
                if rc == REQ_DONE:
                    run._clear()
                    continue
                run._drop(served)  # what is left is a run (or a request) as Python's paths take it
                why = DECLINED if run.nreq == 1 else RUN
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
