# cython: language_level=3
"""An NBD connection's common case in C: receive, parse, serve one request, reply, repeat.

The kernel's swap I/O is mostly single READs and WRITEs of a few 4 KiB blocks (most often one),
one at a time.  ``serve_loop`` runs the connection while that lasts, without the GIL and without a Python object per request:
recv (polling for a while first, then sleeping), parse with _nbdwire.RequestRun, serve the blocks
through the store's RequestPath (ext/_reqpath.pyx), pack the reply and send it.  It returns to
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
    IDLE = 4        # no request came while polling: call again with ``block`` to sleep in recv

LOOP_RUN, LOOP_DECLINED, LOOP_PARSER, LOOP_EOF, LOOP_IDLE = RUN, DECLINED, PARSER, EOF, IDLE


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


def serve_loop(RequestRun run, RequestPath path, uint64_t key_base, int fd, uint8_t[::1] buf,
               Py_ssize_t start, Py_ssize_t end, uint64_t export_size, uint32_t max_block, uint32_t min_block,
               int64_t spin_ns, bint block):
    """Serve single requests from ``buf[start:end]`` and the socket ``fd`` (blocking) until
    something needs Python.  Returns (start, end, why, served, declined): the buffer's new bounds
    (data may have moved to the front), LOOP_*, and how many requests C served and declined.
    A request is served here when the parser takes it alone (whole 4 KiB blocks, no flag but FUA).

    It polls the socket for ``spin_ns`` before waiting for a request; before the first such wait
    it returns LOOP_IDLE instead, unless ``block``, so the server's counters are never more than
    one idle period behind.  Raises OSError when the socket fails."""
    if run.nreq:
        raise ValueError("serve_loop needs an empty run")
    if start < 0 or end > buf.shape[0] or start > end:
        raise ValueError(f"bad buffer range {start}..{end} of {buf.shape[0]}")
    cdef Py_ssize_t cap = buf.shape[0], served = 0, declined = 0
    cdef ssize_t got
    cdef int rc, err = 0, why = -1
    cdef int64_t deadline
    cdef uint8_t *b = &buf[0]
    with nogil:
        while True:
            start = run._parse(b, start, end, export_size, max_block, min_block)
            if run.nreq == 1:
                rc = serve_one(run, path, key_base, fd, &err)
                if err:
                    break
                if rc != REQ_DONE:
                    declined += 1
                    why = DECLINED
                    break
                served += 1
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
            deadline = now_ns() + spin_ns
            while True:  # poll first: the next request usually follows the reply within microseconds
                got = recv(fd, b + end, cap - end, MSG_DONTWAIT)
                if got >= 0 or (errno != EAGAIN and errno != EINTR) or now_ns() >= deadline:
                    break
            if got < 0 and (errno == EAGAIN or errno == EINTR):
                if not block:
                    why = IDLE
                    break
                block = False  # once: the requests this wait brings go on to the next idle
                got = recv(fd, b + end, cap - end, 0)
                while got < 0 and errno == EINTR:
                    got = recv(fd, b + end, cap - end, 0)
            if got < 0:
                err = errno
                break
            if got == 0:
                why = EOF
                break
            end += got
    if err:
        raise OSError(err, os.strerror(err))
    return start, end, why, served, declined

