# cython: language_level=3
"""The tcp transport's data protocol in C: both ends of a data connection, GIL released.

The frames of rram/transport/wire.py (the specification and the fuzzed reference decoder),
handled in C on both sides, one C call per post, per poll and per provider connection, with
no Python object per frame or per op:

* ``WireServer``: the provider's side; ``serve`` runs the request loop (receive a REQUEST,
  check every key against the session's ``_regions.RegionTable``, copy, answer).
* ``WireRequester``: the requester's side; ``post`` checks lkeys and sends a REQUEST,
  ``poll`` parses COMPLETIONs, scatters READ data and fills the completion array.

With a frame key (``set_frame_key``, after the HELLO) both directions are signed: each REQUEST
and each COMPLETION carries its sequence number (one counter per direction) and a truncated
HMAC-SHA256, REQUESTs under the frame key over header + descriptors, COMPLETIONs under the
completion key (``completion_key``: derived with its own label) over the header.  A frame
that fails either check ends the connection (R_BAD_MAC) before anything in it is used.

Any frame the C code rejects is handed back to Python (a negative ``R_*`` code plus
``detail()``), which words the error with wire.py, so the messages have one source.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (
    PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
    PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK, NOWAIT_LOCK,
)
from libc.errno cimport errno, EINTR, EAGAIN
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove, memcmp, memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from ops cimport (
    OP_READ, OP_WRITE, WC_LOC_PROT_ERR, WC_SUCCESS, completion_t, op_t,
)
from rram._ext._regions cimport RegionTable
from spin cimport (
    SPIN_PREEMPT_NS, spin_budget, spin_counters, spin_for_batch, spin_init, spin_init_pair, spin_observe,
    spin_observe_request, spin_pair_counters, spin_t,
)


# mirrors WIRE_OP in rram/transport/wire.py (24 bytes)
cdef packed struct wire_op_t:
    uint64_t remote_addr
    uint32_t length
    uint32_t rkey
    uint8_t opcode
    uint8_t reserved[7]

assert sizeof(op_t) == 32 and sizeof(wire_op_t) == 24


cdef int _run_wire(RegionTable table, const wire_op_t *d, Py_ssize_t n, const uint8_t *src, uint8_t *dst,
                   uint32_t max_len, Py_ssize_t *done, uint64_t *rbytes, uint64_t *wbytes) noexcept nogil:
    """Execute n wire ops in order under the table lock; ``done`` = index of the failing op, or n."""
    cdef Py_ssize_t i
    cdef int status = WC_SUCCESS
    cdef uint64_t woff = 0, roff = 0
    table._lock()
    for i in range(n):
        status = table._check_remote(d[i].opcode, d[i].remote_addr, d[i].length, d[i].rkey, max_len)
        if status != WC_SUCCESS:
            break
        if d[i].opcode == OP_WRITE:
            memcpy(<void *>d[i].remote_addr, src + woff, d[i].length)
            woff += d[i].length
        else:
            memcpy(dst + roff, <const void *>d[i].remote_addr, d[i].length)
            roff += d[i].length
    table._unlock()
    done[0] = i if status != WC_SUCCESS else n
    rbytes[0] = roff
    wbytes[0] = woff
    return status


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL
    int SHUT_RDWR

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN
    short POLLOUT

cdef extern from *:
    """
    /* counters written by one serving thread, read by any (provider stats) */
    static inline void rram_add_u64(uint64_t *p, uint64_t v)
    { __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED); }
    static inline uint64_t rram_load_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    """
    void rram_add_u64(uint64_t *p, uint64_t v) nogil
    uint64_t rram_load_u64(const uint64_t *p) nogil

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD:
        pass
    const EVP_MD *EVP_sha256()

cdef extern from "openssl/hmac.h" nogil:
    unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len, const unsigned char *d, size_t n,
                        unsigned char *md, unsigned int *md_len)

cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void *a, const void *b, size_t n)

cdef extern from *:
    """
    #include <openssl/evp.h>
    #include <openssl/params.h>
    /* One key's HMAC-SHA256, its key schedule done once: EVP_MAC_init without a key starts a
       new MAC under the same key.  The one-shot HMAC() fetches the algorithm and hashes the
       padded key again on every call, ~2 us against ~0.3 us here for a 56-byte frame (measured
       with OpenSSL 3.0 on this project's 2-vCPU machine); a frame MAC is on every round trip. */
    static void *rram_mac_new(const unsigned char *key, size_t n)
    {
        EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
        EVP_MAC_CTX *ctx = mac ? EVP_MAC_CTX_new(mac) : NULL;
        OSSL_PARAM p[2] = {OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0), OSSL_PARAM_construct_end()};
        EVP_MAC_free(mac);  /* the context holds its own reference */
        if (ctx != NULL && !EVP_MAC_init(ctx, key, n, p)) {
            EVP_MAC_CTX_free(ctx);
            ctx = NULL;
        }
        return ctx;
    }
    static void rram_mac_free(void *ctx) { EVP_MAC_CTX_free((EVP_MAC_CTX *)ctx); }
    /* the first 16 bytes of the MAC of d[:n] into out; 0 if OpenSSL failed (out is then zeros,
       which the peer refuses: a frame is never sent with a MAC that was not computed) */
    static int rram_mac(void *ctx, const unsigned char *d, size_t n, unsigned char *out)
    {
        unsigned char md[32];
        size_t len = 0;
        EVP_MAC_CTX *c = (EVP_MAC_CTX *)ctx;
        if (!EVP_MAC_init(c, NULL, 0, NULL) || !EVP_MAC_update(c, d, n) || !EVP_MAC_final(c, md, &len, sizeof md)) {
            memset(out, 0, 16);
            return 0;
        }
        memcpy(out, md, 16);
        return 1;
    }
    """
    void *rram_mac_new(const unsigned char *key, size_t n) nogil
    void rram_mac_free(void *ctx) nogil
    int rram_mac(void *ctx, const unsigned char *d, size_t n, unsigned char *out) nogil

cdef enum:
    FLAG_MAC = 1        # header flags: a MAC_TRAILER-byte MAC follows the REQUEST/COMPLETION payload
    MAC_TRAILER = 16
    FRAME_KEY = 32

# No frame is numbered this (wire.SEQ_END): after 2**32 - 1 requests a connection must be
# replaced, since wrapped numbers would let an old frame be replayed.
cdef uint32_t SEQ_END = 0xFFFFFFFF

# wire.COMPLETION_LABEL: the completion key is HMAC-SHA256(frame key, this)
cdef const char *COMPLETION_LABEL = b"rram-data-completions\0"
cdef enum:
    COMPLETION_LABEL_LEN = 22


cdef void _completion_key(const uint8_t *key, uint8_t *out) noexcept nogil:
    """What wire.completion_key computes: the provider -> requester direction's own key."""
    cdef unsigned int mdlen = 32
    HMAC(EVP_sha256(), key, FRAME_KEY, <const unsigned char *>COMPLETION_LABEL, COMPLETION_LABEL_LEN, out, &mdlen)


cdef int _set_keys(const uint8_t[::1] key, void **rmac, void **cmac) except -1:
    """Replace a core's two MAC contexts with those of frame ``key``: requests under the key
    itself, completions under its completion key."""
    cdef uint8_t ckey[FRAME_KEY]
    if key.shape[0] != FRAME_KEY:
        raise ValueError(f"frame key must be {FRAME_KEY} bytes")
    _completion_key(&key[0], ckey)
    _free_keys(rmac, cmac)
    rmac[0] = rram_mac_new(&key[0], FRAME_KEY)
    cmac[0] = rram_mac_new(ckey, FRAME_KEY)
    memset(ckey, 0, FRAME_KEY)
    if rmac[0] == NULL or cmac[0] == NULL:
        _free_keys(rmac, cmac)
        raise MemoryError("OpenSSL could not set up HMAC-SHA256")
    return 0


cdef void _free_keys(void **rmac, void **cmac) noexcept nogil:
    if rmac[0] != NULL:
        rram_mac_free(rmac[0])
    if cmac[0] != NULL:
        rram_mac_free(cmac[0])
    rmac[0] = cmac[0] = NULL


cdef inline void _frame_mac(void *ctx, const uint8_t *frame, size_t n, uint8_t *out) noexcept nogil:
    """HMAC-SHA256 under ``ctx``'s key of frame[:n], truncated: what wire.request_mac (header |
    descriptors, frame key) and wire.completion_mac (header, completion key) compute."""
    rram_mac(ctx, frame, n, out)


def completion_key(const uint8_t[::1] key):
    """The completion key C derives from a frame key (tests: it must equal wire.completion_key)."""
    cdef uint8_t out[FRAME_KEY]
    if key.shape[0] != FRAME_KEY:
        raise ValueError(f"a {FRAME_KEY}-byte key")
    _completion_key(&key[0], out)
    return (<char *>out)[:FRAME_KEY]


cdef class FrameMac:
    """One key's frame MAC as the cores compute it (tests, benchmarks: ``mac(frame)``)."""

    cdef void *ctx

    def __cinit__(self, const uint8_t[::1] key):
        if key.shape[0] != FRAME_KEY:
            raise ValueError(f"a {FRAME_KEY}-byte key")
        self.ctx = rram_mac_new(&key[0], FRAME_KEY)
        if self.ctx == NULL:
            raise MemoryError("OpenSSL could not set up HMAC-SHA256")

    def __dealloc__(self):
        if self.ctx != NULL:
            rram_mac_free(self.ctx)

    def mac(self, const uint8_t[::1] frame):
        cdef uint8_t out[MAC_TRAILER]
        if frame.shape[0] == 0:
            raise ValueError("a non-empty frame")
        with nogil:
            _frame_mac(self.ctx, &frame[0], frame.shape[0], out)
        return (<char *>out)[:MAC_TRAILER]


def frame_mac(const uint8_t[::1] key, const uint8_t[::1] frame):
    """The MAC both ends compute over a REQUEST's header and descriptors, or (under the
    completion key) a COMPLETION's header (tests)."""
    return FrameMac(key).mac(frame)


cdef extern from *:
    """
    /* the provider-wide I/O budget: every serving thread takes and gives bytes concurrently */
    static inline int rram_budget_take(int64_t *avail, int64_t n)
    {
        int64_t cur = __atomic_load_n(avail, __ATOMIC_RELAXED);
        do {
            if (cur < n) return 0;
        } while (!__atomic_compare_exchange_n(avail, &cur, cur - n, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        return 1;
    }
    static inline void rram_budget_give(int64_t *avail, int64_t n) { __atomic_fetch_add(avail, n, __ATOMIC_RELAXED); }
    static inline int rram_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void rram_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    """
    bint rram_budget_take(int64_t *avail, int64_t n) nogil
    void rram_budget_give(int64_t *avail, int64_t n) nogil
    int rram_load_int(const int *p) nogil
    void rram_store_int(int *p, int v) nogil

# mirrors wire.py (tcp.py checks WIRE_CONSTANTS against it at import)
cdef enum:
    HDR = 32
    VERSION = 2
    T_HELLO = 1
    T_HELLO_OK = 2
    T_REQUEST = 3
    T_COMPLETION = 4
    T_ERROR = 5
    MAX_OPS = 4096
    MAX_OP_LENGTH = 1 << 20
    MAX_PAYLOAD = 64 << 20
    MAX_MESSAGE = 4096
    INITIAL_BUFFER = 1 << 16
    # a provider connection idle this long gives its buffers' growth back to the I/O budget
    # (WireServer._release_when_idle)
    IDLE_RELEASE_MS = 100

WIRE_CONSTANTS = {"HEADER": HDR, "VERSION": VERSION, "HELLO": T_HELLO, "HELLO_OK": T_HELLO_OK,
                  "REQUEST": T_REQUEST, "COMPLETION": T_COMPLETION, "ERROR": T_ERROR, "MAX_OPS": MAX_OPS,
                  "MAX_OP_LENGTH": MAX_OP_LENGTH, "MAX_PAYLOAD": MAX_PAYLOAD, "MAX_MESSAGE": MAX_MESSAGE,
                  "FLAG_MAC": FLAG_MAC, "MAC_TRAILER": MAC_TRAILER}

# Result codes (negative; 0 or more is success).  ``detail()`` gives (a, b, c) for each.
cdef enum:
    # the socket failed; a = errno
    R_OS_ERROR = -10
    # the peer closed the connection (a = bytes of a partial frame left, provider side)
    R_EOF = -11
    # a header the C code refuses; ``header()`` returns its 32 bytes for wire.parse_header to word
    R_BAD_HEADER = -12
    # an ERROR frame arrived (requester): a = code; ``payload()`` holds the message
    R_ERROR_FRAME = -13
    # a frame type that is legal on the wire but not here (requester: HELLO_OK)
    R_UNEXPECTED = -14
    # requester: completion for the wrong batch: a = its batch id, b = expected, c = 1 if any pending
    R_WRONG_BATCH = -15
    # requester: completion names op a of b sent ops (c = batch id)
    R_BAD_INDEX = -16
    # payload size a does not match the op lengths (c = batch id on the requester)
    R_BAD_PAYLOAD = -17
    # provider: a request reads a bytes, more than MAX_PAYLOAD
    R_READ_LIMIT = -18
    # requester: the provider sent more than every outstanding completion could hold
    R_OVERFLOW = -19
    # the connection was shut from another thread
    R_SHUT = -20
    # out of memory growing a buffer
    R_NOMEM = -21
    # provider: growing a buffer to a = bytes would exceed the provider-wide I/O budget
    R_BUDGET = -22
    # provider: a started frame (a = bytes buffered) did not finish within frame_timeout_ns
    R_TIMEOUT = -23
    # provider: request a (its sequence number b) lacks the MAC, or the MAC does not verify;
    # requester: the same for completion a (sequence number b) on a connection with a frame key
    R_BAD_MAC = -24
    # requester: this connection's request numbers are used up (a = the last); nothing was sent:
    # the owner reconnects (a new connection, a new key) rather than let the numbers wrap
    R_SEQ_END = -25
    # post refused before anything was sent: max_outstanding batches in flight
    R_TOO_MANY = -30
    # post refused: a = number of ops, outside 1..max_batch
    R_BAD_COUNT = -31
    # post refused: a = WRITE bytes, b = READ bytes, one of them over MAX_PAYLOAD
    R_TOO_BIG = -32

RESULT_CODES = {
    "R_OS_ERROR": R_OS_ERROR,
    "R_EOF": R_EOF,
    "R_BAD_HEADER": R_BAD_HEADER,
    "R_ERROR_FRAME": R_ERROR_FRAME,
    "R_UNEXPECTED": R_UNEXPECTED,
    "R_WRONG_BATCH": R_WRONG_BATCH,
    "R_BAD_INDEX": R_BAD_INDEX,
    "R_BAD_PAYLOAD": R_BAD_PAYLOAD,
    "R_READ_LIMIT": R_READ_LIMIT,
    "R_OVERFLOW": R_OVERFLOW,
    "R_SHUT": R_SHUT,
    "R_NOMEM": R_NOMEM,
    "R_BUDGET": R_BUDGET,
    "R_TIMEOUT": R_TIMEOUT,
    "R_BAD_MAC": R_BAD_MAC,
    "R_SEQ_END": R_SEQ_END,
    "R_TOO_MANY": R_TOO_MANY,
    "R_BAD_COUNT": R_BAD_COUNT,
    "R_TOO_BIG": R_TOO_BIG,
}
globals().update(RESULT_CODES)

cdef packed struct header_t:
    char magic[4]
    uint8_t version
    uint8_t type
    uint16_t flags
    uint64_t batch_id
    uint32_t count
    int32_t status
    uint32_t payload_len
    uint32_t reserved


# pending_t, framebuf_t, MAX_RING and C_EINTR/C_NEED: rram/_ext/_tcpwire.pxd

assert sizeof(header_t) == 32 and sizeof(completion_t) == 16


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void _put_header(uint8_t *buf, uint8_t ftype, uint64_t batch_id, uint32_t count, int32_t status,
                             uint32_t payload_len) noexcept nogil:
    cdef header_t *h = <header_t *>buf
    memcpy(h.magic, b"RRMD", 4)
    h.version = VERSION
    h.type = ftype
    h.flags = 0
    h.batch_id = batch_id
    h.count = count
    h.status = status
    h.payload_len = payload_len
    h.reserved = 0


cdef inline bint _magic_ok(const header_t *h) noexcept nogil:
    return memcmp(h.magic, b"RRMD", 4) == 0 and h.version == VERSION


cdef int _wait(int fd, short events, int timeout_ms, short *revents) noexcept nogil:
    """poll() one fd: 1 ready, 0 timed out, C_EINTR, or -errno."""
    cdef pollfd p
    p.fd = fd
    p.events = events
    p.revents = 0
    cdef int r = poll(&p, 1, timeout_ms)
    if r < 0:
        return C_EINTR if errno == EINTR else -errno
    revents[0] = p.revents
    return r


cdef int _fb_init(framebuf_t *fb) noexcept nogil:
    fb.buf = <uint8_t *>malloc(INITIAL_BUFFER)
    fb.cap = INITIAL_BUFFER if fb.buf != NULL else 0
    fb.start = fb.end = 0
    fb.budget = NULL
    fb.held = fb.cap
    return 0 if fb.buf != NULL else R_NOMEM


cdef int _fb_reserve(framebuf_t *fb, size_t need) noexcept nogil:
    """Hold ``need`` bytes of the budget for this buffer before it grows toward them: the whole
    frame at once, so that concurrent big frames cannot each take part of the budget and all
    starve; one gets it, the others are refused at their header."""
    if fb.budget == NULL or need <= fb.held:
        return 0
    if not rram_budget_take(fb.budget, need - fb.held):
        return R_BUDGET
    fb.held = need
    return 0


cdef inline size_t _fb_avail(const framebuf_t *fb) noexcept nogil:
    return fb.end - fb.start


cdef inline void _fb_consume(framebuf_t *fb, size_t n) noexcept nogil:
    fb.start += n
    if fb.start == fb.end:
        fb.start = fb.end = 0


cdef int _fb_room(framebuf_t *fb, size_t need) noexcept nogil:
    """Make free space after ``end`` for the frame at ``start`` (``need`` bytes in all)."""
    cdef size_t newcap
    cdef uint8_t *nb
    if fb.cap - fb.start < need and fb.start:
        memmove(fb.buf, fb.buf + fb.start, fb.end - fb.start)
        fb.end -= fb.start
        fb.start = 0
    if fb.end < fb.cap:
        return 0
    newcap = need if need < 2 * fb.cap else 2 * fb.cap
    if newcap <= fb.cap:
        newcap = fb.cap + HDR
    if _fb_reserve(fb, newcap) < 0:
        return R_BUDGET
    nb = <uint8_t *>realloc(fb.buf, newcap)
    if nb == NULL:
        return R_NOMEM
    fb.buf, fb.cap = nb, newcap
    return 0


cdef void _fb_shrink(framebuf_t *fb) noexcept nogil:
    """Give a budgeted buffer's growth back once what it holds fits the initial size again,
    so a connection that sent one big batch does not keep the budget while it idles."""
    cdef size_t n = fb.end - fb.start
    cdef uint8_t *nb
    if fb.budget == NULL or fb.held <= INITIAL_BUFFER or n > INITIAL_BUFFER:
        return
    if fb.start:
        memmove(fb.buf, fb.buf + fb.start, n)
        fb.start, fb.end = 0, n
    nb = <uint8_t *>realloc(fb.buf, INITIAL_BUFFER)
    if nb != NULL:
        rram_budget_give(fb.budget, fb.held - INITIAL_BUFFER)
        fb.buf, fb.cap, fb.held = nb, INITIAL_BUFFER, INITIAL_BUFFER


cdef int _fb_fill(framebuf_t *fb, int fd, int flags) noexcept nogil:
    """One recv into the free space: bytes received, 0 at EOF, -EAGAIN, C_EINTR or -errno."""
    cdef ssize_t r = recv(fd, fb.buf + fb.end, fb.cap - fb.end, flags)
    if r > 0:
        fb.end += r
        return <int>r
    if r == 0:
        return 0
    if errno == EINTR:
        return C_EINTR
    return -EAGAIN if (errno == EAGAIN or errno == EWOULDBLOCK) else -errno


cdef bytes _fb_front(const framebuf_t *fb, size_t n):
    """The first n buffered bytes (for error messages)."""
    n = min(n, _fb_avail(fb))
    return (<char *>fb.buf + fb.start)[:n]


cdef int _send_all(int fd, const uint8_t *buf, size_t n, int64_t deadline, const int *cancel=NULL) noexcept nogil:
    """Send n bytes (blocking via poll); 0, C_EINTR is retried, -ETIMEDOUT past ``deadline`` (ns, 0 none),
    -ECANCELED soon after ``*cancel`` becomes non-zero (another thread is shutting the connection)."""
    cdef ssize_t r
    cdef short rev
    cdef int w, ms
    while n:
        r = send(fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT)
        if r > 0:
            buf += r
            n -= r
            continue
        if errno == EINTR:
            continue
        if errno != EAGAIN and errno != EWOULDBLOCK:
            return -errno
        ms = -1
        if deadline:
            ms = <int>((deadline - _now_ns()) // 1000000)
            if ms <= 0:
                return -110  # ETIMEDOUT
        if cancel != NULL:
            if rram_load_int(cancel):
                return -125  # ECANCELED
            if ms < 0 or ms > 50:
                ms = 50  # wake up to look at *cancel
        w = _wait(fd, POLLOUT, ms, &rev)
        if w < 0 and w != C_EINTR:
            return w
    return 0


cdef class IoBudget:
    """Bytes of data-connection buffers one provider may hold in all, shared by its WireServers.

    Each connection starts with two INITIAL_BUFFER buffers (taken at creation: a connection
    that does not fit is refused) and takes every byte it grows by, giving it back once the
    frame is done; so what hostile peers make the provider buffer is bounded by ``total``.
    """

    cdef int64_t avail
    cdef readonly int64_t total

    def __cinit__(self, int64_t total):
        if total < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {total}")
        self.total = total
        self.avail = total

    @property
    def available(self):
        return rram_load_u64(<uint64_t *>&self.avail)

    @property
    def per_connection(self):
        """Bytes a connection takes before it receives anything."""
        return 2 * INITIAL_BUFFER


cdef inline void _spun(spin_t *s, int64_t t0, int64_t last, bint caught, bint preempted) noexcept nogil:
    """A wait (for a completion, or a provider's for a request) polled from t0 to last: count the time, tell the policy the outcome."""
    s.spun_ns += <uint64_t>(last - t0)
    spin_observe(s, caught, preempted)


cdef int _set_spin(spin_t *s, int n, int64_t cap_ns, bint adaptive) except -1:
    """Both cores' ``set_spin`` (of ``n`` policies from ``s``): poll up to ``cap_ns`` before
    sleeping, only while that pays (``adaptive``, ext/spin.pxd) or on every wait.  Resets the
    policies and their counters."""
    cdef int i
    if cap_ns < 0:
        raise ValueError(f"spin cap must be >= 0 ns, got {cap_ns}")
    for i in range(n):
        spin_init(&s[i], cap_ns, adaptive)
    return 0


cdef dict _spin_report(const spin_t *s):
    """Both cores' ``spin_counters``: hits, misses, preempted, probes, us polled, sleeps."""
    c = spin_counters(s, "")
    c["sleeps"] = s.sleeps
    return c


cdef class WireServer:
    """The provider's side of one data connection: ``serve`` runs the request loop in C.

    Each REQUEST is received into one buffer (header and body, often in one recv), checked,
    executed against the session's region table and answered with one send, with the GIL
    released throughout.  ``shut`` (any thread) sends an ERROR frame and shuts the socket; a
    lock keeps it from landing inside a COMPLETION.  Buffers come out of an ``IoBudget``;
    a started frame must finish within ``frame_timeout_ns`` and a reply must leave within
    ``send_timeout_ns`` (0: no limit), so a peer that drips or stops reading is dropped.
    """

    cdef int fd
    cdef framebuf_t rx
    cdef uint8_t *out
    cdef size_t out_cap
    cdef PyThread_type_lock send_lock
    cdef bint closed
    cdef int cancel            # set by shut(): a send blocked on the peer gives up
    cdef uint64_t counts[4]    # ops, batches, bytes_read, bytes_written
    cdef uint64_t failed
    cdef int64_t a, b
    cdef IoBudget budget_obj
    cdef void *rmac            # set_frame_key: every REQUEST must carry a MAC under the frame key
    cdef void *cmac            # ... and every COMPLETION is signed under the completion key
    cdef bint keyed
    cdef uint32_t seq          # the sequence number the next REQUEST must carry
    cdef uint32_t cseq         # the sequence number of the next COMPLETION
    cdef spin_t spin           # whether a wait for the next request polls before it sleeps (ext/spin.pxd)
    cdef public int64_t frame_timeout_ns
    cdef public int64_t send_timeout_ns

    def __cinit__(self, int fd, IoBudget budget=None):
        self.fd = fd
        self.rx.buf = NULL
        self.out = NULL
        self.send_lock = NULL
        self.rmac = self.cmac = NULL
        if budget is not None:
            if not rram_budget_take(&budget.avail, 2 * INITIAL_BUFFER):
                raise BufferError(f"the provider's I/O budget of {budget.total} bytes is taken")
        self.out = <uint8_t *>malloc(INITIAL_BUFFER)
        self.out_cap = INITIAL_BUFFER
        if _fb_init(&self.rx) < 0:
            self.rx.held = INITIAL_BUFFER  # __dealloc__ gives back what was taken
        self.budget_obj = budget
        if budget is not None:
            self.rx.budget = &budget.avail
        if self.rx.buf == NULL:
            raise MemoryError()
        self.send_lock = PyThread_allocate_lock()
        if self.out == NULL or self.send_lock == NULL:
            raise MemoryError()
        self.closed = False
        self.cancel = 0
        self.counts[0] = self.counts[1] = self.counts[2] = self.counts[3] = 0
        self.failed = 0
        spin_init(&self.spin, 0, True)
        self.frame_timeout_ns = 0
        self.send_timeout_ns = 0

    def __dealloc__(self):
        self._free_buffers()
        _free_keys(&self.rmac, &self.cmac)
        if self.send_lock != NULL:
            PyThread_free_lock(self.send_lock)

    cdef void _free_buffers(self) noexcept:
        if self.budget_obj is not None:
            rram_budget_give(&self.budget_obj.avail, <int64_t>(self.rx.held + self.out_cap))
            self.budget_obj = None
        free(self.out)
        free(self.rx.buf)
        self.out, self.out_cap = NULL, 0
        self.rx.buf, self.rx.cap, self.rx.held, self.rx.start, self.rx.end = NULL, 0, 0, 0, 0

    def release(self):
        """After ``serve`` returned, in its thread: free the buffers and give their budget back now,
        not whenever the object is collected.  Only ``shut``/``mark_closed`` may follow."""
        self._free_buffers()

    cdef inline int64_t _send_deadline(self) noexcept nogil:
        return _now_ns() + self.send_timeout_ns if self.send_timeout_ns > 0 else 0

    @property
    def spin_ns(self):
        """The poll budget of a wait for the next request (0: sleep in recv at once)."""
        return self.spin.cap_ns

    @spin_ns.setter
    def spin_ns(self, int64_t cap_ns):
        self.set_spin(cap_ns, self.spin.adaptive)

    def set_spin(self, int64_t cap_ns, bint adaptive=True):
        """How the wait for the next request polls (``_set_spin``)."""
        _set_spin(&self.spin, 1, cap_ns, adaptive)

    def spin_counters(self):
        """The request wait's spin (``_spin_report``)."""
        return _spin_report(&self.spin)

    def set_frame_key(self, const uint8_t[::1] key, uint32_t first=0):
        """From now on every REQUEST must carry its sequence number (header ``reserved``, from
        0) and a MAC under ``key`` (32 bytes) over its header and descriptors, and every
        COMPLETION carries its own sequence number and a MAC under the completion key.
        (``first``: both numberings start there instead; tests of the end of the numbers.)"""
        _set_keys(key, &self.rmac, &self.cmac)
        self.keyed, self.seq, self.cseq = True, first, first

    def counters(self):
        """(ops, batches, bytes_read, bytes_written, failed batches) so far."""
        return (rram_load_u64(&self.counts[0]), rram_load_u64(&self.counts[1]), rram_load_u64(&self.counts[2]),
                rram_load_u64(&self.counts[3]), rram_load_u64(&self.failed))

    def detail(self):
        return self.a, self.b, 0

    def header(self):
        """The 32 header bytes at the front of the receive buffer (after R_BAD_HEADER)."""
        return _fb_front(&self.rx, HDR)

    def send_frame(self, const uint8_t[::1] frame):
        """Send a whole frame unless the connection was shut; returns False if it was."""
        cdef int rc = 0
        with nogil:
            PyThread_acquire_lock(self.send_lock, WAIT_LOCK)
            if not self.closed:
                rc = _send_all(self.fd, &frame[0], frame.shape[0], self._send_deadline(),
                               &self.cancel) if frame.shape[0] else 0
            PyThread_release_lock(self.send_lock)
        if rc < 0:
            raise OSError(-rc, f"send failed (errno {-rc})")
        return not self.closed

    def shut(self, const uint8_t[::1] frame, double timeout):
        """Send ``frame`` (an ERROR) within ``timeout`` seconds if possible, then shut the socket.
        Idempotent; returns False if the connection was already shut or closed."""
        cdef int64_t deadline = _now_ns() + <int64_t>(timeout * 1e9)
        cdef bint was_closed
        with nogil:
            # a reply blocked on a peer that stopped reading holds the lock: make it give up
            rram_store_int(&self.cancel, 1)
            PyThread_acquire_lock(self.send_lock, WAIT_LOCK)
            was_closed = self.closed
            if not was_closed:
                self.closed = True
                _send_all(self.fd, &frame[0], frame.shape[0], deadline)
                shutdown(self.fd, SHUT_RDWR)
            PyThread_release_lock(self.send_lock)
        return not was_closed

    def mark_closed(self):
        """Before the owner closes the fd: later ``shut``/``send_frame`` calls must not touch it."""
        with nogil:
            PyThread_acquire_lock(self.send_lock, WAIT_LOCK)
            self.closed = True
            PyThread_release_lock(self.send_lock)

    def serve(self, RegionTable table):
        """Answer REQUEST frames until the peer goes away or breaks the protocol.

        Returns R_EOF (a = partial frame bytes left), R_SHUT, R_OS_ERROR (a = errno),
        R_BAD_HEADER, R_BAD_PAYLOAD (a = payload bytes), R_READ_LIMIT (a = READ bytes) or R_NOMEM.
        """
        cdef int rc
        with nogil:
            rc = self._serve(table)
        return rc

    cdef int _serve(self, RegionTable table) noexcept nogil:
        cdef framebuf_t *rx = &self.rx
        cdef const header_t *h
        cdef size_t avail, total
        cdef int r, ms
        cdef short rev = 0
        cdef int64_t frame_deadline = 0  # set when a started frame first has to wait for bytes
        while True:
            avail = _fb_avail(rx)
            if avail >= HDR:
                h = <const header_t *>(rx.buf + rx.start)
                # flags other than FLAG_MAC are refused as wire.parse_header does; an unsigned
                # connection takes no FLAG_MAC either (its trailer would be read as the next frame)
                if (not _magic_ok(h) or h.type != T_REQUEST or h.count < 1 or h.count > MAX_OPS
                        or h.payload_len > MAX_PAYLOAD or h.flags & ~FLAG_MAC or (h.flags and not self.keyed)):
                    return R_BAD_HEADER
                total = HDR + <size_t>h.count * sizeof(wire_op_t) + h.payload_len
                if self.keyed:
                    if not (h.flags & FLAG_MAC):
                        self.a, self.b = self.seq, h.reserved
                        return R_BAD_MAC
                    total += MAC_TRAILER
                if avail >= total:
                    r = self._execute(table, h)
                    if r < 0:
                        return r
                    _fb_consume(rx, total)
                    frame_deadline = 0
                    continue
                r = _fb_reserve(rx, total)
                if r == 0:
                    r = _fb_room(rx, total)
                if r < 0:
                    self.a = total
                    return r
            elif _fb_room(rx, HDR) < 0:
                return R_NOMEM
            if avail and self.frame_timeout_ns > 0:
                # inside a frame: never block past its deadline (a peer dripping bytes holds a buffer)
                r = _fb_fill(rx, self.fd, MSG_DONTWAIT)
                if r == -EAGAIN:
                    if frame_deadline == 0:
                        frame_deadline = _now_ns() + self.frame_timeout_ns
                    ms = <int>((frame_deadline - _now_ns()) // 1000000)
                    if ms <= 0:
                        self.a = avail
                        return R_TIMEOUT
                    r = _wait(self.fd, POLLIN, ms, &rev)
                    if r >= 0 or r == C_EINTR:
                        continue
                    self.a = -r
                    return R_OS_ERROR
            else:
                r = self._fill_spinning(rx)
            if r > 0:
                continue
            if r == 0:
                self.a = avail
                return R_EOF
            if r == C_EINTR:
                continue
            if r == -EAGAIN:
                r = _wait(self.fd, POLLIN, -1, &rev)
                if r >= 0 or r == C_EINTR:
                    continue
            self.a = -r
            return R_OS_ERROR

    cdef int _fill_spinning(self, framebuf_t *rx) noexcept nogil:
        """recv of the next request: when none is there yet, poll for the spin policy's budget
        (ext/spin.pxd: only while polls catch requests) before a blocking recv.  Polling keeps
        the CPU awake for a requester that sends again soon, which otherwise pays for waking
        it (measured on 2 vCPUs, requester and provider apart: store.get p50 45 -> 11 us)."""
        cdef int r
        cdef int64_t now, t0, last, end
        cdef bint preempted = False
        if self.spin.cap_ns == 0:
            self._release_when_idle(rx)
            return _fb_fill(rx, self.fd, 0)
        r = _fb_fill(rx, self.fd, MSG_DONTWAIT)
        if r != -EAGAIN:
            return r  # there already: not a wait
        end = spin_budget(&self.spin)
        t0 = last = _now_ns()
        if end > 0:
            end += t0
            while True:
                r = _fb_fill(rx, self.fd, MSG_DONTWAIT)
                now = _now_ns()
                if r != -EAGAIN:
                    _spun(&self.spin, t0, now, True, preempted)
                    return r
                if now - last > SPIN_PREEMPT_NS:
                    preempted = True
                last = now
                if now >= end:
                    self.spin.spun_ns += <uint64_t>(last - t0)
                    break
        self.spin.sleeps += 1
        self._release_when_idle(rx)
        r = _fb_fill(rx, self.fd, 0)
        spin_observe_request(&self.spin, end > 0, preempted, _now_ns() - t0)  # a miss, idle or neither
        return r

    cdef void _release_when_idle(self, framebuf_t *rx) noexcept nogil:
        """Before sleeping until the next request: if big frames grew this connection's
        buffers, wait IDLE_RELEASE_MS for it first, and give the growth back to the budget only
        if none came, so that an idle connection holds no more than it started with while a
        stream of big batches keeps its buffers.  (Shrinking them after every frame made each
        one grow again through fresh pages: at 100 k remote 4 KiB writes/s, page faults under
        recv took ~12 % of the providers' CPU.)"""
        cdef short rev = 0
        cdef uint8_t *nb
        if rx.budget == NULL or _fb_avail(rx) or (rx.held <= INITIAL_BUFFER and self.out_cap <= INITIAL_BUFFER):
            return  # (a frame begun holds its reservation until it is done)
        if _wait(self.fd, POLLIN, IDLE_RELEASE_MS, &rev) != 0:
            return  # a request (or EOF, an error, a signal: the recv that follows sees it)
        _fb_shrink(rx)
        if self.out_cap > INITIAL_BUFFER:
            nb = <uint8_t *>realloc(self.out, INITIAL_BUFFER)
            if nb != NULL:
                rram_budget_give(rx.budget, self.out_cap - INITIAL_BUFFER)
                self.out, self.out_cap = nb, INITIAL_BUFFER

    cdef int _execute(self, RegionTable table, const header_t *h) noexcept nogil:
        cdef const wire_op_t *d = <const wire_op_t *>(<const uint8_t *>h + HDR)
        cdef uint32_t n = h.count, i
        cdef const uint8_t *payload = <const uint8_t *>d + <size_t>n * sizeof(wire_op_t)
        cdef uint64_t wtotal = 0, rtotal = 0, rbytes, wbytes, need
        cdef size_t trailer = MAC_TRAILER if self.keyed else 0
        cdef Py_ssize_t done
        cdef int status, rc
        cdef uint8_t *nb
        cdef uint8_t mac[MAC_TRAILER]
        # the requester's _encode tallies its op_t array the same way; these are wire descriptors
        for i in range(n):
            if d[i].opcode == OP_WRITE:
                wtotal += d[i].length
            elif d[i].opcode == OP_READ:
                rtotal += d[i].length
        if wtotal != h.payload_len:
            self.a = h.payload_len
            return R_BAD_PAYLOAD
        if rtotal > MAX_PAYLOAD:
            self.a = rtotal
            return R_READ_LIMIT
        if self.keyed:  # before anything runs: altered, replayed, reordered or unsigned frames stop here
            _frame_mac(self.rmac, <const uint8_t *>h, HDR + <size_t>n * sizeof(wire_op_t), mac)
            if (h.reserved != self.seq or self.seq == SEQ_END
                    or CRYPTO_memcmp(mac, payload + h.payload_len, MAC_TRAILER) != 0):
                self.a, self.b = self.seq, h.reserved
                return R_BAD_MAC
            self.seq += 1
        need = HDR + rtotal + trailer
        if need > self.out_cap:
            if self.rx.budget != NULL and not rram_budget_take(self.rx.budget, need - self.out_cap):
                self.a = need
                return R_BUDGET
            nb = <uint8_t *>realloc(self.out, need)
            if nb == NULL:
                if self.rx.budget != NULL:
                    rram_budget_give(self.rx.budget, need - self.out_cap)
                return R_NOMEM
            self.out, self.out_cap = nb, need
        status = _run_wire(table, d, n, payload, self.out + HDR, MAX_OP_LENGTH, &done, &rbytes, &wbytes)
        rram_add_u64(&self.counts[0], done)
        rram_add_u64(&self.counts[1], 1)
        rram_add_u64(&self.counts[2], rbytes)
        rram_add_u64(&self.counts[3], wbytes)
        if status != WC_SUCCESS:
            rram_add_u64(&self.failed, 1)
        _put_header(self.out, T_COMPLETION, h.batch_id, <uint32_t>done, status, <uint32_t>rbytes)
        if self.keyed:  # the requester believes nothing of it (status above all) without this
            (<header_t *>self.out).flags = FLAG_MAC
            (<header_t *>self.out).reserved = self.cseq
            self.cseq += 1
            _frame_mac(self.cmac, self.out, HDR, self.out + HDR + rbytes)
        PyThread_acquire_lock(self.send_lock, WAIT_LOCK)
        if self.closed:
            PyThread_release_lock(self.send_lock)
            return R_SHUT
        rc = _send_all(self.fd, self.out, HDR + rbytes + trailer, self._send_deadline(), &self.cancel)
        PyThread_release_lock(self.send_lock)
        if rc < 0:
            self.a = -rc
            return R_OS_ERROR
        return 0


cdef class WireRequester:
    """The requester's side of one data connection: post and poll in one C call each.

    ``post`` checks the lkeys, encodes header + descriptors + WRITE data into one buffer and
    sends it; while the socket is full it buffers incoming completions (bounded by what the
    outstanding batches can legally return), so neither side blocks on the other.  ``poll``
    parses completions straight from the receive buffer, scatters READ data and fills the
    completion array.  Waiting for one, it polls with a non-blocking recv for up to ``spin_ns``
    before sleeping in poll(), while polling pays (ext/spin.pxd): when the provider shares our
    CPU, a poll cannot be answered (the provider does not run while we poll) and only delays it.
    """

    # attributes and C methods: rram/_ext/_tcpwire.pxd (the page store's C request path calls them)

    def __cinit__(self, RegionTable local, uint32_t max_outstanding, uint32_t max_batch):
        if not 1 <= max_outstanding <= MAX_RING or not 1 <= max_batch <= MAX_OPS:
            raise ValueError(f"max_outstanding 1..{MAX_RING}, max_batch 1..{MAX_OPS}")
        self.local = local
        self.fd = -1
        self.rmac = self.cmac = NULL
        if _fb_init(&self.rx) < 0:
            raise MemoryError()
        self.sbuf = <uint8_t *>malloc(INITIAL_BUFFER)
        if self.sbuf == NULL:
            raise MemoryError()
        self.scap = INITIAL_BUFFER
        self.soff = self.slen = 0
        cdef int i
        for i in range(MAX_RING):
            self.ring[i].ops = NULL
            self.ring[i].ops_cap = 0
        self.head = self.count = 0
        self.max_outstanding = max_outstanding
        self.max_batch = max_batch
        self.eof = False
        spin_init_pair(self.spin, 0, True)

    def __dealloc__(self):
        cdef int i
        free(self.sbuf)
        free(self.rx.buf)
        _free_keys(&self.rmac, &self.cmac)
        for i in range(MAX_RING):
            free(self.ring[i].ops)

    @property
    def outstanding(self):
        return self.count

    @property
    def spin_ns(self):
        """The poll budget of a wait for a completion (0: sleep in poll() at once)."""
        return self.spin[0].cap_ns

    @spin_ns.setter
    def spin_ns(self, int64_t cap_ns):
        self.set_spin(cap_ns, self.spin[0].adaptive)

    def set_spin(self, int64_t cap_ns, bint adaptive=True):
        """How the wait for a completion polls (``_set_spin``), small batches' and large ones'."""
        _set_spin(self.spin, 2, cap_ns, adaptive)

    @property
    def spin_on(self):
        """Whether the wait for a small batch's completion polls (the latency path's)."""
        return bool(self.spin[0].on)

    def spin_counters(self, which=None):
        """The completion waits' spin (``_spin_report``): small and large batches' summed, or
        ``which`` ("small", "large") of the two."""
        if which is not None:
            return _spin_report(&self.spin[("small", "large").index(which)])
        return spin_pair_counters(self.spin)

    def next_budget_ns(self, bint large=False):
        """The next completion wait's poll budget, as ``poll`` takes it: tests."""
        return spin_budget(&self.spin[1 if large else 0])

    def observe(self, bint caught, bint preempted=False, bint large=False):
        """Record a polled wait's outcome, as ``poll`` does: tests."""
        spin_observe(&self.spin[1 if large else 0], caught, preempted)

    def detail(self):
        return self.a, self.b, self.c

    def header(self):
        return _fb_front(&self.rx, HDR)

    def payload(self):
        """The body of the frame at the front (after R_ERROR_FRAME)."""
        return _fb_front(&self.rx, HDR + MAX_MESSAGE)[HDR:]

    def attach(self, int fd):
        """Start on a fresh connection (``fd`` non-blocking, HELLO done): nothing pending."""
        self.detach()
        self.fd = fd

    def set_frame_key(self, const uint8_t[::1] key, uint32_t first=0):
        """Sign every REQUEST and take only signed, in-order COMPLETIONs from now on (after
        ``attach``: each connection has its own key; ``first`` as in WireServer.set_frame_key)."""
        _set_keys(key, &self.rmac, &self.cmac)
        self.keyed, self.seq, self.cseq = True, first, first

    def detach(self):
        """Forget the connection and every outstanding batch (the owner closes the fd)."""
        self.fd = -1
        self.head = self.count = 0
        self.rx.start = self.rx.end = 0
        self.soff = self.slen = 0
        self.eof = False
        self.keyed = False

    def post(self, object ops, uint64_t batch_id):
        """Send a contiguous 1-D OP_DTYPE array as one batch: 0, or a negative R_* code.

        Raises BufferError or ValueError (nothing sent) for a non-contiguous array; a signal exception while
        blocked leaves a partial frame on the wire: the caller must drop the connection.
        """
        cdef Py_buffer view
        cdef int rc
        if self.fd < 0:
            self.a = 9  # EBADF
            return R_OS_ERROR
        PyObject_GetBuffer(ops, &view, PyBUF_C_CONTIGUOUS)
        try:
            if self.count >= self.max_outstanding:
                return R_TOO_MANY
            n = view.len // sizeof(op_t)
            if n < 1 or n > self.max_batch:
                self.a = n
                return R_BAD_COUNT
            with nogil:
                rc = self._encode(<const op_t *>view.buf, n, batch_id)
                if rc == 0:
                    rc = self._send_frame()
            while rc == C_EINTR:
                PyErr_CheckSignals()
                with nogil:
                    rc = self._send_frame()
            return rc
        finally:
            PyBuffer_Release(&view)

    cdef int _encode(self, const op_t *o, Py_ssize_t n, uint64_t batch_id) noexcept nogil:
        """Check lkeys, build the REQUEST frame in ``sbuf`` and queue the batch as pending."""
        cdef uint64_t w = 0, r = 0, nread = 0, need
        cdef Py_ssize_t i, k = n
        cdef wire_op_t *d
        cdef uint8_t *p
        cdef uint8_t *nb
        cdef op_t *nops
        cdef pending_t *slot
        if self.keyed and self.seq == SEQ_END:
            self.a = self.seq
            return R_SEQ_END
        for i in range(n):
            if o[i].opcode == OP_WRITE:
                w += o[i].length
            elif o[i].opcode == OP_READ:
                r += o[i].length
        if w > MAX_PAYLOAD or r > MAX_PAYLOAD:
            self.a, self.b = w, r
            return R_TOO_BIG
        need = HDR + <uint64_t>n * sizeof(wire_op_t) + w + MAC_TRAILER
        if need > self.scap:
            nb = <uint8_t *>realloc(self.sbuf, need)
            if nb == NULL:
                return R_NOMEM
            self.sbuf, self.scap = nb, need
        slot = &self.ring[(self.head + self.count) % MAX_RING]
        if <size_t>n > slot.ops_cap:
            nops = <op_t *>realloc(slot.ops, n * sizeof(op_t))
            if nops == NULL:
                return R_NOMEM
            slot.ops, slot.ops_cap = nops, n
        d = <wire_op_t *>(self.sbuf + HDR)
        w = 0
        self.local._lock()
        for i in range(n):
            if not self.local._inside(o[i].lkey, o[i].local_addr, o[i].length):
                k = i
                break
        p = <uint8_t *>(d + k)
        for i in range(k):
            d[i].remote_addr = o[i].remote_addr
            d[i].length = o[i].length
            d[i].rkey = o[i].rkey
            d[i].opcode = o[i].opcode
            memset(d[i].reserved, 0, 7)
            if o[i].opcode == OP_WRITE:
                memcpy(p, <const void *>o[i].local_addr, o[i].length)
                p += o[i].length
                w += o[i].length
            elif o[i].opcode == OP_READ:
                nread += o[i].length
        self.local._unlock()
        memcpy(slot.ops, o, k * sizeof(op_t))
        slot.batch_id = batch_id
        slot.sent = <uint32_t>k
        slot.cut = k < n
        slot.nread = nread
        self.count += 1
        self.soff = 0
        self.slen = 0
        if k:
            _put_header(self.sbuf, T_REQUEST, batch_id, <uint32_t>k, 0, <uint32_t>w)
            self.slen = HDR + <size_t>k * sizeof(wire_op_t) + w
            if self.keyed:
                (<header_t *>self.sbuf).flags = FLAG_MAC
                (<header_t *>self.sbuf).reserved = self.seq
                self.seq += 1
                _frame_mac(self.rmac, self.sbuf, HDR + <size_t>k * sizeof(wire_op_t), self.sbuf + self.slen)
                self.slen += MAC_TRAILER
        return 0

    cdef int _send_frame(self) noexcept nogil:
        """Send sbuf[soff:slen]; while the socket is full, buffer what the provider sends."""
        cdef ssize_t r
        cdef short rev = 0
        cdef int w
        while self.soff < self.slen:
            r = send(self.fd, self.sbuf + self.soff, self.slen - self.soff, MSG_NOSIGNAL | MSG_DONTWAIT)
            if r > 0:
                self.soff += r
                continue
            if errno == EINTR:
                continue
            if errno != EAGAIN and errno != EWOULDBLOCK:
                self.a = errno
                return R_OS_ERROR
            w = _wait(self.fd, POLLOUT if self.eof else POLLIN | POLLOUT, -1, &rev)
            if w == C_EINTR:
                return C_EINTR
            if w < 0:
                self.a = -w
                return R_OS_ERROR
            if rev & POLLIN and not self.eof:
                w = self._buffer_incoming()
                if w < 0:
                    return w
        return 0

    cdef int _buffer_incoming(self) noexcept nogil:
        """Receive into the buffer without parsing, up to what the pending batches may return."""
        cdef uint64_t bound = HDR + MAX_MESSAGE
        cdef uint32_t i
        cdef size_t avail = _fb_avail(&self.rx)
        cdef int r
        for i in range(self.count):
            bound += HDR + self.ring[(self.head + i) % MAX_RING].nread + MAC_TRAILER
        if avail >= bound:
            self.a = avail
            return R_OVERFLOW
        if _fb_room(&self.rx, min(bound, avail + INITIAL_BUFFER)) < 0:
            return R_NOMEM
        r = _fb_fill(&self.rx, self.fd, MSG_DONTWAIT)
        if r == 0:
            self.eof = True
        elif r < 0 and r != -EAGAIN and r != C_EINTR:
            self.a = -r
            return R_OS_ERROR
        return 0

    def poll(self, object out, double timeout):
        """Fill ``out`` (contiguous COMPLETION_DTYPE) with up to len(out) completions; wait up to
        ``timeout`` seconds (< 0: forever) for the first.  Returns n >= 0 or a negative R_* code."""
        cdef Py_buffer view
        cdef Py_ssize_t got = 0
        cdef int64_t deadline = -1
        if self.fd < 0:
            self.a = 9
            return R_OS_ERROR
        if timeout >= 0:
            deadline = _now_ns() + <int64_t>(timeout * 1e9)
        PyObject_GetBuffer(out, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
        try:
            while True:
                with nogil:
                    got = self._poll(<completion_t *>view.buf, view.len // sizeof(completion_t), deadline)
                if got != C_EINTR:
                    return got
                PyErr_CheckSignals()
        finally:
            PyBuffer_Release(&view)

    cdef Py_ssize_t _poll(self, completion_t *out, Py_ssize_t cap, int64_t deadline) noexcept nogil:
        cdef Py_ssize_t got = 0
        cdef pending_t *p
        cdef int r, ms
        cdef int64_t now, t0 = 0, last = 0, spin_end = -1  # -1: not waited yet
        cdef bint watching = False, preempted = False      # watching: a polled wait, outcome not told yet
        cdef short rev = 0
        cdef spin_t *sp = &self.spin[0]                     # the policy of the batch waited for
        while got < cap:
            p = &self.ring[self.head]
            if self.count and p.sent == 0:  # refused by the lkey check, never sent
                out[got].batch_id = p.batch_id
                out[got].status = WC_LOC_PROT_ERR
                out[got].index = 0
                self.head = (self.head + 1) % MAX_RING
                self.count -= 1
                got += 1
                continue
            r = self._next_completion(&out[got])
            if r == 0:
                got += 1
                continue
            if got:  # hand over what is done; a bad frame stays at the front and fails the next poll
                break
            if r < 0:
                return r
            r = _fb_fill(&self.rx, self.fd, MSG_DONTWAIT)
            if r > 0:
                if watching:  # the completion's first bytes came while polling
                    _spun(sp, t0, last, True, preempted)
                    watching = False
                continue
            if r == 0:
                self.eof = True
                return R_EOF
            if r != -EAGAIN and r != C_EINTR:
                self.a = -r
                return R_OS_ERROR
            now = _now_ns()
            if deadline >= 0 and now >= deadline:  # (a zero timeout only looks: not a wait)
                return 0
            if spin_end < 0:  # nothing there yet: poll a little first if the spin policy says it pays
                sp = spin_for_batch(self.spin, p.sent)
                spin_end = now + spin_budget(sp)  # (a wake-up costs more than a short round trip)
                watching = spin_end > now
                t0 = last = now
            if now < spin_end and (deadline < 0 or now < deadline):
                if now - last > SPIN_PREEMPT_NS:
                    preempted = True
                last = now
                continue
            if watching:
                if now >= spin_end:  # ran out (a deadline that cut it short says nothing)
                    _spun(sp, t0, last, False, preempted)
                watching = False
            sp.sleeps += 1
            ms = -1
            if deadline >= 0:
                ms = <int>((deadline - now + 999999) // 1000000)
            r = _wait(self.fd, POLLIN, ms, &rev)
            if r < 0:
                if r == C_EINTR:
                    return C_EINTR
                self.a = -r
                return R_OS_ERROR
        return got

    cdef int _next_completion(self, completion_t *c) noexcept nogil:
        """Complete the head batch from the frame at the front: 0 done, C_NEED, or an R_* code.
        Nothing is consumed unless it returns 0, so a failure repeats on the next call."""
        cdef framebuf_t *rx = &self.rx
        cdef size_t avail = _fb_avail(rx), total
        cdef const header_t *h
        cdef pending_t *p = &self.ring[self.head]
        cdef uint32_t done, i
        cdef uint64_t rtotal = 0, off = 0
        cdef const uint8_t *data
        cdef int lstatus = WC_SUCCESS
        cdef size_t trailer = MAC_TRAILER if self.keyed else 0
        cdef uint8_t mac[MAC_TRAILER]
        if avail < HDR:
            return C_NEED if _fb_room(rx, HDR) == 0 else R_NOMEM
        h = <const header_t *>(rx.buf + rx.start)
        if not _magic_ok(h) or (h.type != T_HELLO_OK and h.type != T_COMPLETION and h.type != T_ERROR):
            return R_BAD_HEADER
        if h.type == T_HELLO_OK:
            return R_BAD_HEADER if h.payload_len else R_UNEXPECTED
        if h.type == T_ERROR:
            if h.payload_len > MAX_MESSAGE:
                return R_BAD_HEADER
            if avail < HDR + h.payload_len:
                return C_NEED if _fb_room(rx, HDR + h.payload_len) == 0 else R_NOMEM
            self.a = h.count
            return R_ERROR_FRAME
        # as wire.parse_header; an unsigned connection takes no FLAG_MAC (its trailer would be
        # read as the next frame), a signed one nothing else
        if h.payload_len > MAX_PAYLOAD or h.flags & ~FLAG_MAC or (h.flags and not self.keyed):
            return R_BAD_HEADER
        if self.keyed and not (h.flags & FLAG_MAC):
            self.a, self.b = self.cseq, h.reserved
            return R_BAD_MAC
        if self.count == 0:  # nothing is due: no completion, signed or not, may arrive
            self.a, self.b, self.c = h.batch_id, p.batch_id, 0
            return R_WRONG_BATCH
        if h.payload_len > p.nread:  # more than the batch could return: refuse before buffering it
            self.a, self.c = h.payload_len, p.batch_id
            return R_BAD_PAYLOAD
        total = HDR + h.payload_len + trailer
        if avail < total:
            return C_NEED if _fb_room(rx, total) == 0 else R_NOMEM
        if self.keyed:  # before any field is believed: altered, replayed, reordered or forged frames stop here
            _frame_mac(self.cmac, <const uint8_t *>h, HDR, mac)
            if (h.reserved != self.cseq or self.cseq == SEQ_END
                    or CRYPTO_memcmp(mac, rx.buf + rx.start + HDR + h.payload_len, MAC_TRAILER) != 0):
                self.a, self.b = self.cseq, h.reserved
                return R_BAD_MAC
        if h.batch_id != p.batch_id:
            self.a, self.b, self.c = h.batch_id, p.batch_id, 1
            return R_WRONG_BATCH
        done = p.sent if h.status == WC_SUCCESS else h.count
        if done > p.sent or (h.status == WC_SUCCESS and h.count != p.sent):  # success names every sent op
            self.a, self.b, self.c = h.count, p.sent, p.batch_id
            return R_BAD_INDEX
        for i in range(done):
            if p.ops[i].opcode == OP_READ:
                rtotal += p.ops[i].length
        if rtotal != h.payload_len:
            self.a, self.c = h.payload_len, p.batch_id
            return R_BAD_PAYLOAD
        data = rx.buf + rx.start + HDR
        self.local._lock()
        for i in range(done):
            if p.ops[i].opcode != OP_READ:
                continue
            if not self.local._inside(p.ops[i].lkey, p.ops[i].local_addr, p.ops[i].length):
                lstatus = WC_LOC_PROT_ERR
                break
            memcpy(<void *>p.ops[i].local_addr, data + off, p.ops[i].length)
            off += p.ops[i].length
        self.local._unlock()
        c.batch_id = p.batch_id
        if lstatus != WC_SUCCESS:
            c.status, c.index = lstatus, i
        elif h.status == WC_SUCCESS and p.cut:
            c.status, c.index = WC_LOC_PROT_ERR, p.sent
        else:
            c.status, c.index = h.status, h.count
        _fb_consume(rx, total)
        if self.keyed:
            self.cseq += 1
        self.head = (self.head + 1) % MAX_RING
        self.count -= 1
        return 0
