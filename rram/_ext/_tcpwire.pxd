# The tcp transport's requester core (ext/_tcpwire.pyx), declared for the page store's C request
# path (ext/_reqpath.pyx), which posts one READ batch and polls its completion on a link's core
# without the GIL, exactly as ``WireRequester.post``/``poll`` do for Python.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from ops cimport completion_t, op_t
from rram._ext._regions cimport RegionTable
from spin cimport spin_t

cdef enum:
    MAX_RING = 64       # batches outstanding on one connection, at most
    C_EINTR = -99       # internal: a wait was interrupted by a signal (callers retry or check it with the GIL)
    C_NEED = 1          # internal: the frame at the front needs more bytes


cdef struct pending_t:
    uint64_t batch_id
    uint64_t nread      # READ bytes of the sent ops: the most the completion may carry
    uint32_t sent       # ops sent; 0 = refused by the lkey check, nothing sent
    uint32_t cut        # ops after ``sent`` failed the lkey check
    op_t *ops           # copy of the sent ops, for the scatter
    size_t ops_cap


cdef struct framebuf_t:
    # received bytes [start, end) of a malloc'd buffer that grows toward the frame at the front,
    # doubling as bytes arrive (a header announcing 64 MiB allocates nothing ahead of the data)
    uint8_t *buf
    size_t cap
    size_t start
    size_t end
    int64_t *budget     # provider: growth beyond INITIAL_BUFFER is taken from here (NULL: none)
    size_t held         # bytes of the budget this buffer holds (>= cap)


cdef class WireRequester:
    cdef RegionTable local
    cdef int fd                # -1: detached (no connection)
    cdef framebuf_t rx
    cdef uint8_t *sbuf
    cdef size_t scap, soff, slen
    cdef pending_t ring[MAX_RING]
    cdef uint32_t head, count, max_outstanding, max_batch   # count: batches outstanding
    cdef bint eof
    cdef int64_t a, b, c
    cdef void *rmac            # set_frame_key: sign every REQUEST (see WireServer.set_frame_key)
    cdef void *cmac            # ... and check every COMPLETION's MAC under the completion key
    cdef bint keyed
    cdef uint32_t seq          # of the next REQUEST
    cdef uint32_t cseq         # the sequence number the next COMPLETION must carry
    cdef spin_t spin[2]        # whether a wait for a completion polls first: small and large batches' (ext/spin.pxd)

    # queue n ops as batch ``batch_id`` and build its frame (0 or an R_* code; nothing sent yet)
    cdef int _encode(self, const op_t *o, Py_ssize_t n, uint64_t batch_id) noexcept nogil
    # send the frame _encode built: 0, C_EINTR (call again: it goes on where it stopped) or an R_* code
    cdef int _send_frame(self) noexcept nogil
    cdef int _buffer_incoming(self) noexcept nogil
    # up to cap completions, waiting until ``deadline`` (ns, CLOCK_MONOTONIC; < 0: forever):
    # how many (0: timed out), C_EINTR, or an R_* code (the connection is unusable)
    cdef Py_ssize_t _poll(self, completion_t *out, Py_ssize_t cap, int64_t deadline) noexcept nogil
    cdef int _next_completion(self, completion_t *c) noexcept nogil
