"""Thin wrappers over libibverbs for the verbs transport (module ``rram._ext._verbs``).

Objects are named after the verbs objects they own (Context, PD, MR, CQ, QP) and follow
pyverbs' lifetimes: each is a context manager, ``close()`` is idempotent, a child keeps its
parent alive and a parent closes its live children first (QP/MR before PD before Context);
``__dealloc__`` frees what ``close()`` was not called for.

The data path crosses the C boundary once per batch: ``QP.post`` turns a whole ``OP_DTYPE``
array into a chain of preallocated ``ibv_send_wr``/``ibv_sge`` and posts it with one
``ibv_post_send``, only the last work request signalled; ``QP.poll`` turns work completions
into one ``COMPLETION_DTYPE`` row per batch.  Both run with the GIL released.  Policy (which
device, which keys, reconnecting) lives in rram/transport/verbs.py.

A QP is also a link's C core (ext/linkcore.pxd): the page store's request path posts one READ
batch and polls it without the GIL through ``QP.c_interface()``'s table, on the same slots and
work request ids as ``post``/``poll``.  When C gives up on a batch (timeout, error) it calls
``abandon``: the QP goes to the error state, so the device drops READ responses that arrive
late and flushes what is left, and C waits (DRAIN_NS at most) for the flush of the batch's last
work request: once it is seen, no READ of that batch can still write into the local buffer.
"""
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals
from cpython.pycapsule cimport PyCapsule_New
from libc.errno cimport EINTR, EIO, errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy, memset, strerror
from posix.unistd cimport usleep
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from libibverbs cimport *
from linkcore cimport CORE_VERBS, core_ops_capsule, core_ops_t
from ops cimport OP_READ, OP_WRITE, WC_LOC_PROT_ERR, completion_t, op_t
from spin cimport (
    SPIN_PREEMPT_NS, spin_budget, spin_for_batch, spin_init_pair, spin_observe, spin_pair_counters, spin_t,
)

import errno as _errno
import weakref

from rram.errors import ConnectionLost, TransportError, TransportUnavailable, os_error

cdef extern from *:
    """
    #include <errno.h>
    static inline void rram_clear_errno(void) { errno = 0; }
    """
    void clear_errno "rram_clear_errno"() nogil

cdef extern from "poll.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum:
        POLLIN


# one posted batch, until the completion of its last work request has been seen
ctypedef struct batch_t:
    uint64_t batch_id
    uint32_t n              # work requests posted (0: nothing went out, see status)
    int32_t status          # reported on success of the last one: set when the batch was
    uint32_t index          # cut short at a local buffer outside its lkey region
    bint busy
    bint reported

# a local MR operations may use: checked before posting (see QP.post)
ctypedef struct local_t:
    uint32_t lkey
    uint64_t addr
    uint64_t length

cdef enum:
    WC_CHUNK = 32
    # busy-poll this long before sleeping on the completion channel: under soft-RoCE an
    # operation takes ~100 us, on hardware a few us, so most waits end while spinning (the C
    # core's waits poll only while polling catches completions: ext/spin.pxd)
    SPIN_NS = 200000
    # how long abandon() waits for the flush of the batch it gave up on, after moving the QP
    # to the error state (a flush is local work: soft-RoCE does it in its next tasklet run)
    DRAIN_NS = 100000000
    POST_BAD_OP = -1        # _post_batch: an op's opcode is neither READ nor WRITE, nothing posted
    # what the C core's post/poll return when the QP cannot go on (ext/linkcore.pxd): the page
    # store notes the link failed and Python suspends it (VerbsEndpoint.c_failure words them)
    V_POST_FAILED = -60     # ibv_post_send refused the batch (detail: errno)
    V_POLL_FAILED = -61     # ibv_poll_cq or the completion channel failed (detail: errno)
    V_BAD_BATCH = -62       # not 1..max_batch ops, or a bad opcode (detail: the count)

C_POST_FAILED, C_POLL_FAILED, C_BAD_BATCH = V_POST_FAILED, V_POLL_FAILED, V_BAD_BATCH

# QP's C core (ext/linkcore.pxd): filled at the end of this module, handed out by QP.c_interface()
cdef core_ops_t VERBS_CORE

# the wr_id of a local operation (bind, invalidate): its slot (high 32 bits) is no batch's
cdef uint64_t LOCAL_WR_ID = 0xFFFFFFFFFFFFFFFFULL

ACCESS_LOCAL_WRITE = IBV_ACCESS_LOCAL_WRITE
ACCESS_REMOTE_READ = IBV_ACCESS_REMOTE_READ
ACCESS_REMOTE_WRITE = IBV_ACCESS_REMOTE_WRITE
ACCESS_MW_BIND = IBV_ACCESS_MW_BIND
#: ibv_device_attr.device_cap_flags bits saying which memory windows the device has
DEVICE_MEM_WINDOW = IBV_DEVICE_MEM_WINDOW
DEVICE_MEM_WINDOW_TYPE_2A = IBV_DEVICE_MEM_WINDOW_TYPE_2A
DEVICE_MEM_WINDOW_TYPE_2B = IBV_DEVICE_MEM_WINDOW_TYPE_2B
PORT_ACTIVE = IBV_PORT_ACTIVE
#: ibv_mtu enum value -> bytes
MTU_BYTES = {IBV_MTU_256: 256, IBV_MTU_512: 512, IBV_MTU_1024: 1024, IBV_MTU_2048: 2048, IBV_MTU_4096: 4096}
LINK_LAYERS = {IBV_LINK_LAYER_UNSPECIFIED: "unspecified", IBV_LINK_LAYER_INFINIBAND: "infiniband",
               IBV_LINK_LAYER_ETHERNET: "ethernet"}
QP_STATES = {IBV_QPS_RESET: "reset", IBV_QPS_INIT: "init", IBV_QPS_RTR: "rtr", IBV_QPS_RTS: "rts",
             IBV_QPS_SQD: "sqd", IBV_QPS_SQE: "sqe", IBV_QPS_ERR: "error"}


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


def device_names():
    """``(names, reason)``: the RDMA devices libibverbs sees, and why there are none.

    Never raises: a kernel without RDMA (ENOSYS), no device (ENODEV) or any other failure
    gives ``([], "a sentence")``; with devices, reason is None.
    """
    cdef int n = 0
    cdef ibv_device** lst
    clear_errno()
    lst = ibv_get_device_list(&n)
    if lst == NULL:
        err = errno
        if err == _errno.ENOSYS:
            return [], "no RDMA support in this kernel (ibv_get_device_list: ENOSYS; no ib_uverbs)"
        return [], f"libibverbs cannot list RDMA devices: {strerror(err).decode()} (errno {err})"
    try:
        names = [ibv_get_device_name(lst[i]).decode() for i in range(n)]
    finally:
        ibv_free_device_list(lst)
    if not names:
        return [], "no RDMA devices (for soft-RoCE on a kernel with rdma_rxe: scripts/rxe-setup.sh IFACE)"
    return names, None


cdef class Resource:
    """Lifetime plumbing shared by every verbs object (see module docstring)."""

    cdef object __weakref__
    cdef object _children
    cdef readonly object parent

    def __cinit__(self, *args, **kwargs):
        self._children = weakref.WeakSet()

    cdef _adopt(self, Resource child):
        child.parent = self
        self._children.add(child)

    def close(self):
        """Free the C object, closing live children first.  Idempotent."""
        for child in list(self._children):
            child.close()
        self._children.clear()
        self._destroy()

    cdef int _destroy(self) except -1:
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef class Context(Resource):
    """An opened RDMA device."""

    cdef ibv_context* ctx
    cdef readonly str name

    def __init__(self, str name):
        cdef int n = 0, i
        cdef ibv_device** lst = ibv_get_device_list(&n)
        if lst == NULL:
            raise TransportUnavailable(f"cannot open RDMA device {name!r}: {device_names()[1]}")
        try:
            for i in range(n):
                if ibv_get_device_name(lst[i]).decode() == name:
                    clear_errno()
                    self.ctx = ibv_open_device(lst[i])
                    if self.ctx == NULL:
                        raise os_error(f"ibv_open_device({name})", errno or _errno.EIO)
                    break
            else:
                have = ", ".join(ibv_get_device_name(lst[i]).decode() for i in range(n)) or "none"
                raise TransportUnavailable(f"no RDMA device named {name!r} (devices: {have})")
        finally:
            ibv_free_device_list(lst)
        self.name = name

    cdef int _check(self) except -1:
        if self.ctx == NULL:
            raise TransportError(f"device context {self.name} is closed")
        return 0

    def query_port(self, int port_num=1):
        """State of one port: state, active_mtu (ibv_mtu value), mtu_bytes, lid, link_layer, gids."""
        cdef ibv_port_attr attr
        self._check()
        memset(&attr, 0, sizeof(attr))
        rc = ibv_query_port(self.ctx, port_num, &attr)
        if rc:
            raise os_error(f"ibv_query_port({self.name}, {port_num})", rc)
        return {"state": attr.state, "active": attr.state == IBV_PORT_ACTIVE,
                "active_mtu": attr.active_mtu, "mtu_bytes": MTU_BYTES.get(attr.active_mtu, 0),
                "lid": attr.lid, "link_layer": LINK_LAYERS.get(attr.link_layer, str(attr.link_layer)),
                "gids": attr.gid_tbl_len}

    def query_gid(self, int port_num=1, int index=0):
        """The 16 raw bytes of GID ``index`` on ``port_num``."""
        cdef ibv_gid gid
        self._check()
        rc = ibv_query_gid(self.ctx, port_num, index, &gid)
        if rc:
            raise os_error(f"ibv_query_gid({self.name}, port {port_num}, index {index})", errno or rc)
        return bytes(gid.raw[:16])

    def query_device(self):
        """The device limits the transport sizes its queues by."""
        cdef ibv_device_attr attr
        self._check()
        rc = ibv_query_device(self.ctx, &attr)
        if rc:
            raise os_error(f"ibv_query_device({self.name})", rc)
        return {"max_qp_wr": attr.max_qp_wr, "max_cqe": attr.max_cqe, "max_mr": attr.max_mr,
                "max_mr_size": attr.max_mr_size, "max_qp_rd_atom": attr.max_qp_rd_atom,
                "max_mw": attr.max_mw, "device_cap_flags": attr.device_cap_flags}

    cdef int _destroy(self) except -1:
        if self.ctx != NULL:
            rc = ibv_close_device(self.ctx)
            self.ctx = NULL
            if rc:
                raise os_error(f"ibv_close_device({self.name})", errno or rc)
        return 0

    def __dealloc__(self):
        if self.ctx != NULL:
            ibv_close_device(self.ctx)


cdef class PD(Resource):
    """A protection domain: keys of MRs in one PD are useless on QPs of another."""

    cdef ibv_pd* pd

    def __init__(self, Context ctx not None):
        ctx._check()
        clear_errno()
        self.pd = ibv_alloc_pd(ctx.ctx)
        if self.pd == NULL:
            raise os_error(f"ibv_alloc_pd({ctx.name})", errno or _errno.ENOMEM)
        ctx._adopt(self)

    cdef int _check(self) except -1:
        if self.pd == NULL:
            raise TransportError("protection domain is closed")
        return 0

    cdef int _destroy(self) except -1:
        if self.pd != NULL:
            rc = ibv_dealloc_pd(self.pd)
            self.pd = NULL
            if rc:
                raise os_error("ibv_dealloc_pd", rc)
        return 0

    def __dealloc__(self):
        if self.pd != NULL:
            ibv_dealloc_pd(self.pd)


cdef class MR(Resource):
    """A registered memory region over (addr, length); the caller keeps that memory alive."""

    cdef ibv_mr* mr
    cdef readonly uintptr_t addr
    cdef readonly size_t length
    cdef readonly uint32_t lkey
    cdef readonly uint32_t rkey

    def __init__(self, PD pd not None, uintptr_t addr, size_t length, int access):
        pd._check()
        if length == 0:
            raise ValueError("cannot register an empty region")
        clear_errno()
        with nogil:
            self.mr = ibv_reg_mr(pd.pd, <void*>addr, length, access)
        if self.mr == NULL:
            raise os_error(f"ibv_reg_mr({addr:#x}, {length})", errno or _errno.EINVAL)
        self.addr, self.length, self.lkey, self.rkey = addr, length, self.mr.lkey, self.mr.rkey
        pd._adopt(self)

    @property
    def closed(self):
        return self.mr == NULL

    cdef int _destroy(self) except -1:
        if self.mr != NULL:
            rc = ibv_dereg_mr(self.mr)
            self.mr = NULL
            if rc:
                raise os_error("ibv_dereg_mr", rc)
        return 0

    def __dealloc__(self):
        if self.mr != NULL:
            ibv_dereg_mr(self.mr)


cdef class MW(Resource):
    """A type-2 memory window.  Unbound it grants nothing; ``QP.bind_mw`` binds it over an MR
    to one QP, and from then on its rkey reaches that memory only in requests arriving on that
    QP (the MR itself is registered without remote access).  ``QP.invalidate`` unbinds it;
    ``close()`` (ibv_dealloc_mw) invalidates and frees it.  It keeps its rkey across rebinds.

    Closing the QP or the MR it is bound to closes the window first: a device refuses to
    deregister an MR under a bound window, and a QP should not die under one.
    """

    cdef ibv_mw* mw
    cdef readonly uint32_t rkey
    cdef readonly object qp     # the QP it is bound to, None while unbound
    cdef readonly object mr     # the MR it was last bound over (kept alive until we are freed)

    def __init__(self, PD pd not None):
        pd._check()
        clear_errno()
        self.mw = ibv_alloc_mw(pd.pd, IBV_MW_TYPE_2)
        if self.mw == NULL:
            raise os_error("ibv_alloc_mw(type 2)", errno or _errno.EOPNOTSUPP)
        self.rkey = self.mw.rkey
        pd._adopt(self)

    @property
    def closed(self):
        return self.mw == NULL

    cdef int _check(self) except -1:
        if self.mw == NULL:
            raise TransportError("memory window is closed")
        return 0

    cdef _unlink(self):
        if self.qp is not None:
            (<Resource>self.qp)._children.discard(self)
            self.qp = None

    cdef int _destroy(self) except -1:
        if self.mw != NULL:
            rc = ibv_dealloc_mw(self.mw)
            self.mw = NULL
            self._unlink()
            if self.mr is not None:
                (<Resource>self.mr)._children.discard(self)
            if rc:
                raise os_error("ibv_dealloc_mw", rc)
        return 0

    def __dealloc__(self):
        if self.mw != NULL:
            ibv_dealloc_mw(self.mw)


cdef class CQ(Resource):
    """A completion queue with its own completion channel, so a waiter can sleep."""

    cdef ibv_cq* cq
    cdef ibv_comp_channel* channel
    cdef unsigned int unacked

    def __init__(self, Context ctx not None, int cqe):
        ctx._check()
        clear_errno()
        self.channel = ibv_create_comp_channel(ctx.ctx)
        if self.channel == NULL:
            raise os_error("ibv_create_comp_channel", errno or _errno.ENOMEM)
        clear_errno()
        self.cq = ibv_create_cq(ctx.ctx, cqe, NULL, self.channel, 0)
        if self.cq == NULL:
            err = errno or _errno.ENOMEM
            ibv_destroy_comp_channel(self.channel)
            self.channel = NULL
            raise os_error(f"ibv_create_cq({cqe})", err)
        ctx._adopt(self)

    cdef int _destroy(self) except -1:
        cdef int rc = 0
        if self.cq != NULL:
            if self.unacked:
                ibv_ack_cq_events(self.cq, self.unacked)
                self.unacked = 0
            rc = ibv_destroy_cq(self.cq)
            self.cq = NULL
        if self.channel != NULL:
            ibv_destroy_comp_channel(self.channel)
            self.channel = NULL
        if rc:
            raise os_error("ibv_destroy_cq", rc)
        return 0

    def __dealloc__(self):
        if self.cq != NULL:
            if self.unacked:
                ibv_ack_cq_events(self.cq, self.unacked)
            ibv_destroy_cq(self.cq)
        if self.channel != NULL:
            ibv_destroy_comp_channel(self.channel)

    cdef int wait_event(self, int timeout_ms) noexcept nogil:
        """Sleep until the armed CQ signals or ``timeout_ms`` passes: 1 event, 0 timeout, -errno."""
        cdef pollfd p
        cdef ibv_cq* ev_cq
        cdef void* ev_ctx
        p.fd = self.channel.fd
        p.events = POLLIN
        p.revents = 0
        rc = poll(&p, 1, timeout_ms)
        if rc < 0:
            return 0 if errno == EINTR else -errno
        if rc == 0:
            return 0
        if ibv_get_cq_event(self.channel, &ev_cq, &ev_ctx):
            return -errno
        self.unacked += 1
        if self.unacked >= 64:      # acking takes a lock: do it in bunches
            ibv_ack_cq_events(self.cq, self.unacked)
            self.unacked = 0
        return 1


cdef class QP(Resource):
    """A reliable-connected queue pair that posts whole batches of one-sided operations.

    ``max_outstanding`` batches of up to ``max_batch`` operations may be in flight.  Work
    request ids carry (slot << 32 | op index), so an error completion names its batch and op.
    Not thread-safe: one thread posts and polls a QP at a time.
    """

    cdef ibv_qp* qp
    cdef CQ cq
    cdef readonly uint32_t max_batch
    cdef readonly uint32_t max_outstanding
    cdef ibv_send_wr* wrs
    cdef ibv_sge* sges
    cdef batch_t* slots
    cdef uint32_t head, used
    cdef local_t* locals_
    cdef uint32_t n_locals
    cdef int wc_next, wc_count
    cdef readonly uint32_t outstanding
    cdef readonly bint broken
    cdef readonly uint8_t port_num
    cdef ibv_wc wcs[WC_CHUNK]
    cdef int32_t c_err          # the C core's last failure: errno (or the op count), for Python
    cdef spin_t spin[2]         # the C core's completion wait: polls up to SPIN_NS while polling pays
                                # (small batches' and large ones' policies, ext/spin.pxd)

    def __init__(self, PD pd not None, CQ cq not None, uint32_t max_batch=256, uint32_t max_outstanding=8):
        cdef ibv_qp_init_attr init
        pd._check()
        if cq.cq == NULL:
            raise TransportError("completion queue is closed")
        if max_batch < 1 or max_outstanding < 1:
            raise ValueError("max_batch and max_outstanding must be >= 1")
        spin_init_pair(self.spin, SPIN_NS, True)
        self.wrs = <ibv_send_wr*>calloc(max_batch, sizeof(ibv_send_wr))
        self.sges = <ibv_sge*>calloc(max_batch, sizeof(ibv_sge))
        self.slots = <batch_t*>calloc(max_outstanding, sizeof(batch_t))
        if self.wrs == NULL or self.sges == NULL or self.slots == NULL:
            raise MemoryError()
        memset(&init, 0, sizeof(init))
        init.send_cq = cq.cq
        init.recv_cq = cq.cq
        init.qp_type = IBV_QPT_RC
        init.sq_sig_all = 0
        init.cap.max_send_wr = max_batch * max_outstanding
        init.cap.max_recv_wr = 1
        init.cap.max_send_sge = 1
        init.cap.max_recv_sge = 1
        clear_errno()
        self.qp = ibv_create_qp(pd.pd, &init)
        if self.qp == NULL:
            raise os_error(f"ibv_create_qp(max_send_wr={max_batch * max_outstanding})", errno or _errno.EINVAL)
        self.cq = cq
        cq._children.add(self)     # the CQ may not be destroyed while this QP uses it
        self.broken = True         # until connect()
        self.max_batch = max_batch
        self.max_outstanding = max_outstanding
        pd._adopt(self)

    @property
    def qp_num(self):
        self._check()
        return self.qp.qp_num

    @property
    def state(self):
        """The QP state as libibverbs last recorded it: "reset", "init", "rtr", "rts", "error"..."""
        self._check()
        return QP_STATES.get(self.qp.state, str(self.qp.state))

    cdef int _check(self) except -1:
        if self.qp == NULL:
            raise TransportError("queue pair is closed")
        return 0

    cdef int _modify(self, ibv_qp_attr* attr, int mask, str what) except -1:
        rc = ibv_modify_qp(self.qp, attr, mask)
        if rc:
            raise os_error(f"ibv_modify_qp to {what} (QP {self.qp.qp_num})", rc)
        return 0

    def connect(self, uint32_t dest_qpn, uint32_t dest_psn, uint32_t my_psn, *,
                uint16_t dlid=0, bytes dgid=None, int sgid_index=0, int hop_limit=64,
                int mtu=IBV_MTU_1024, int port_num=1, int access=0,
                int max_rd_atomic=16, int timeout=14, int retry_cnt=7):
        """RESET -> INIT -> RTR -> RTS towards the peer QP (dest_qpn, dest_psn).

        The address vector comes from ``rram.transport.verbs.address_vector``: an InfiniBand
        peer is reached by ``dlid`` (no GRH); a RoCE peer by its GID, ``dgid``, in a GRH sent
        from our GID at ``sgid_index`` with ``hop_limit``.  ``access`` is what the peer may do
        to our memory (a provider grants remote read/write); ``mtu`` is an ``ibv_mtu`` value
        agreed by both sides.
        """
        cdef ibv_qp_attr a
        self._check()
        if dgid is not None and len(dgid) != 16:
            raise ValueError(f"a GID has 16 bytes, got {len(dgid)}")
        if dgid is None and dlid == 0:
            raise ValueError("an address vector needs a destination LID or GID")
        if not 0 < hop_limit < 256:
            raise ValueError(f"hop_limit is 1..255, got {hop_limit}")
        memset(&a, 0, sizeof(a))
        a.qp_state = IBV_QPS_INIT
        a.pkey_index = 0
        a.port_num = port_num
        a.qp_access_flags = access
        self._modify(&a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, "INIT")

        memset(&a, 0, sizeof(a))
        a.qp_state = IBV_QPS_RTR
        a.path_mtu = <ibv_mtu>mtu
        a.dest_qp_num = dest_qpn
        a.rq_psn = dest_psn
        a.max_dest_rd_atomic = max_rd_atomic
        a.min_rnr_timer = 12
        a.ah_attr.port_num = port_num
        a.ah_attr.dlid = dlid
        if dgid is not None:
            a.ah_attr.is_global = 1
            memcpy(a.ah_attr.grh.dgid.raw, <const char*>dgid, 16)
            a.ah_attr.grh.sgid_index = sgid_index
            a.ah_attr.grh.hop_limit = hop_limit
        self._modify(&a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN
                     | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER, "RTR")

        memset(&a, 0, sizeof(a))
        a.qp_state = IBV_QPS_RTS
        a.sq_psn = my_psn
        a.timeout = timeout
        a.retry_cnt = retry_cnt
        a.rnr_retry = 7
        a.max_rd_atomic = max_rd_atomic
        self._modify(&a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY
                     | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC, "RTS")
        self.port_num = port_num
        self.broken = False

    def reset(self, double drain_timeout=2.0):
        """Back to RESET, ready for ``connect`` again: the QP is moved to ERR, the flushed
        completions of every batch still in flight are drained and dropped, then RESET."""
        cdef ibv_qp_attr a
        cdef uint64_t deadline
        self._check()
        memset(&a, 0, sizeof(a))
        if self.used:
            a.qp_state = IBV_QPS_ERR
            self._modify(&a, IBV_QP_STATE, "ERR")
            self.broken = True
            deadline = now_ns() + <uint64_t>(drain_timeout * 1e9)
            with nogil:
                while self.used and now_ns() < deadline:
                    if self._poll_cq(NULL, 0) < 0:
                        break
        a.qp_state = IBV_QPS_RESET
        self._modify(&a, IBV_QP_STATE, "RESET")
        with nogil:
            self._poll_cq(NULL, 0)   # anything that raced the reset
        memset(self.slots, 0, self.max_outstanding * sizeof(batch_t))
        self.head = self.used = self.outstanding = 0
        self.wc_next = self.wc_count = 0
        self.broken = True            # until connect()

    def bind_mw(self, MW mw not None, MR mr not None, int access, double timeout=5.0):
        """Bind type-2 window ``mw`` over all of ``mr`` to this QP, with ``access`` (remote
        read/write): one signalled BIND_MW work request, waited for.  The window keeps its key,
        so a window moved to a successor QP has the same rkey.  An error completion puts the
        QP in error (TransportError)."""
        cdef ibv_send_wr wr
        mw._check()
        if mr.mr == NULL:
            raise TransportError("memory region is closed")
        if mw.qp is not None:
            raise TransportError(f"window {mw.rkey:#x} is bound to another QP: invalidate it first")
        memset(&wr, 0, sizeof(wr))
        wr.wr_id = LOCAL_WR_ID
        wr.opcode = IBV_WR_BIND_MW
        wr.send_flags = IBV_SEND_SIGNALED
        wr.bind_mw.mw = mw.mw
        wr.bind_mw.rkey = mw.rkey
        wr.bind_mw.bind_info.mr = mr.mr
        wr.bind_mw.bind_info.addr = mr.addr
        wr.bind_mw.bind_info.length = mr.length
        wr.bind_mw.bind_info.mw_access_flags = access
        self._local_op(&wr, f"bind window {mw.rkey:#x}", timeout)
        if mw.mr is not None and mw.mr is not mr:
            (<Resource>mw.mr)._children.discard(mw)
        mw.qp, mw.mr = self, mr
        self._children.add(mw)
        mr._children.add(mw)

    def invalidate(self, MW mw not None, double timeout=5.0):
        """Unbind ``mw`` (a LOCAL_INV work request on this QP, waited for): its rkey reaches
        nothing until it is bound again.  This QP need not be the one it was bound to (so a
        window can leave a QP in error), but must be working."""
        cdef ibv_send_wr wr
        mw._check()
        memset(&wr, 0, sizeof(wr))
        wr.wr_id = LOCAL_WR_ID
        wr.opcode = IBV_WR_LOCAL_INV
        wr.send_flags = IBV_SEND_SIGNALED
        wr.invalidate_rkey = mw.rkey
        self._local_op(&wr, f"invalidate window {mw.rkey:#x}", timeout)
        mw._unlink()

    cdef int _local_op(self, ibv_send_wr* wr, str what, double timeout) except -1:
        """Post one signalled local work request and wait for its completion (busy, then
        in 50 us naps).  Only between batches: the completion is taken off the CQ here."""
        cdef ibv_send_wr* bad = NULL
        cdef ibv_wc wc
        cdef int got = 0, rc, spins = 0
        cdef uint32_t qpn
        cdef uint64_t deadline
        self._check()
        if self.broken:
            raise ConnectionLost(f"QP {self.qp.qp_num} is in error or not connected: cannot {what}")
        if self.used:
            raise TransportError(f"QP {self.qp.qp_num} has batches in flight: cannot {what}")
        qpn = self.qp.qp_num
        rc = ibv_post_send(self.qp, wr, &bad)
        if rc:
            raise os_error(f"ibv_post_send ({what}, QP {qpn})", rc)
        deadline = now_ns() + <uint64_t>(timeout * 1e9)
        with nogil:
            while True:
                got = ibv_poll_cq(self.cq.cq, 1, &wc)
                if got < 0 or (got == 1 and wc.wr_id == LOCAL_WR_ID and wc.qp_num == qpn):
                    break
                got = 0
                if now_ns() > deadline:
                    break
                spins += 1
                if spins > 1000:
                    usleep(50)
        if got < 0:
            raise os_error(f"ibv_poll_cq ({what})", errno or _errno.EIO)
        if got == 0:
            self.broken = True
            raise TransportError(f"{what}: no completion on QP {qpn} after {timeout:g}s")
        if wc.status != IBV_WC_SUCCESS:
            self.broken = True
            raise TransportError(f"{what} on QP {qpn} failed: {ibv_wc_status_str(wc.status).decode()} "
                                 f"(status {wc.status}, vendor error {wc.vendor_err})")
        return 0

    def allow_local(self, uint32_t lkey, uint64_t addr, uint64_t length):
        """Let operations use local MR ``lkey`` over [addr, addr + length)."""
        cdef local_t* grown = <local_t*>realloc(self.locals_, (self.n_locals + 1) * sizeof(local_t))
        if grown == NULL:
            raise MemoryError()
        self.locals_ = grown
        self.locals_[self.n_locals] = local_t(lkey, addr, length)
        self.n_locals += 1

    def forbid_local(self, uint32_t lkey):
        cdef uint32_t i = 0
        while i < self.n_locals:
            if self.locals_[i].lkey == lkey:
                self.n_locals -= 1
                self.locals_[i] = self.locals_[self.n_locals]
            else:
                i += 1

    cdef bint _local_ok(self, const op_t* o) noexcept nogil:
        cdef uint32_t i
        for i in range(self.n_locals):
            if self.locals_[i].lkey == o.lkey:
                return (o.local_addr >= self.locals_[i].addr
                        and o.length <= self.locals_[i].length
                        and o.local_addr - self.locals_[i].addr <= self.locals_[i].length - o.length)
        return False

    def post(self, ops, uint64_t batch_id):
        """Post ``ops`` (a C-contiguous 1-D OP_DTYPE array) as one batch with one ibv_post_send.

        Local buffers are checked against the MRs named by ``allow_local`` first: devices
        disagree on how they report a bad lkey (soft-RoCE says "local QP operation error"),
        so an op outside its local region cuts the batch there and the batch completes with
        WC_LOC_PROT_ERR at that op, after the ops before it ran, as base.py specifies.
        """
        cdef Py_buffer view
        cdef Py_ssize_t n, where = 0
        cdef int rc = 0
        self._check()
        if self.broken:
            raise ConnectionLost(f"QP {self.qp.qp_num} is in error or not connected: recover() first")
        if self.used >= self.max_outstanding:
            raise TransportError(f"{self.max_outstanding} batches already outstanding: poll first")
        PyObject_GetBuffer(ops, &view, PyBUF_C_CONTIGUOUS)
        try:
            if view.itemsize != sizeof(op_t) or view.ndim != 1:
                raise ValueError(f"ops must be a 1-D OP_DTYPE array (itemsize {sizeof(op_t)})")
            n = view.shape[0]
            if n < 1 or n > self.max_batch:
                raise ValueError(f"a batch holds 1..{self.max_batch} operations, got {n}")
            with nogil:
                rc = self._post_batch(<op_t*>view.buf, n, batch_id, &where)
            if rc == POST_BAD_OP:
                raise ValueError(f"op {where}: opcode {(<op_t*>view.buf)[where].opcode} is neither OP_READ nor OP_WRITE")
        finally:
            PyBuffer_Release(&view)
        if rc == 0:
            return
        if where > 0:
            self.reset()  # part of the chain went out, unsignalled: flush it (the batch is reported)
        raise os_error(f"ibv_post_send (batch {batch_id}, op {where} of {n})", rc)

    cdef int _post_batch(self, const op_t* o, Py_ssize_t n, uint64_t batch_id, Py_ssize_t* where) noexcept nogil:
        """Post ops[0:n] (1..max_batch; a slot free, the QP connected) as batch ``batch_id``
        with one ibv_post_send, only the last work request signalled: 0 when posted (cut short at
        an op outside its local region included, see ``post``); POST_BAD_OP, nothing posted, op
        ``where`` has a bad opcode; or ibv_post_send's errno, ``where`` work requests having
        gone out (the batch is then reported; the caller flushes them: ``reset``/``_abandon``)."""
        cdef Py_ssize_t i, cut = -1
        cdef uint32_t slot = (self.head + self.used) % self.max_outstanding
        cdef ibv_send_wr* bad_wr = NULL
        cdef int rc = 0
        for i in range(n):
            if o[i].opcode != OP_READ and o[i].opcode != OP_WRITE:
                where[0] = i
                return POST_BAD_OP
        for i in range(n):
            if not self._local_ok(&o[i]):
                cut = i
                n = i
                break
            self.sges[i].addr = o[i].local_addr
            self.sges[i].length = o[i].length
            self.sges[i].lkey = o[i].lkey
            self.wrs[i].wr_id = (<uint64_t>slot << 32) | <uint64_t>i
            self.wrs[i].next = &self.wrs[i + 1]
            self.wrs[i].sg_list = &self.sges[i]
            self.wrs[i].num_sge = 1
            self.wrs[i].opcode = IBV_WR_RDMA_READ if o[i].opcode == OP_READ else IBV_WR_RDMA_WRITE
            self.wrs[i].send_flags = 0
            self.wrs[i].wr.rdma.remote_addr = o[i].remote_addr
            self.wrs[i].wr.rdma.rkey = o[i].rkey
        if n > 0:
            self.wrs[n - 1].next = NULL
            self.wrs[n - 1].send_flags = IBV_SEND_SIGNALED
            rc = ibv_post_send(self.qp, self.wrs, &bad_wr)
        if rc == 0:
            self._take_slot(slot, batch_id, n, False)
            if cut >= 0:
                self.slots[slot].status = WC_LOC_PROT_ERR
                self.slots[slot].index = cut
            return 0
        where[0] = (bad_wr - self.wrs) if bad_wr != NULL else 0
        if where[0] > 0:
            self._take_slot(slot, batch_id, where[0], True)
        return rc

    cdef void _take_slot(self, uint32_t slot, uint64_t batch_id, uint32_t n, bint reported) noexcept nogil:
        self.slots[slot].batch_id = batch_id
        self.slots[slot].n = n
        self.slots[slot].status = 0
        self.slots[slot].index = 0
        self.slots[slot].busy = True
        self.slots[slot].reported = reported
        self.used += 1
        if not reported:
            self.outstanding += 1

    cdef void _release_head(self) noexcept nogil:
        while self.used and not self.slots[self.head].busy:
            self.head = (self.head + 1) % self.max_outstanding
            self.used -= 1

    cdef int _emit_unposted(self, completion_t* out, int emitted, int cap) noexcept nogil:
        """Batches cut short before their first op are done as soon as they are the oldest."""
        cdef batch_t* b
        while self.used and (out == NULL or emitted < cap):
            b = &self.slots[self.head]
            if not b.busy or b.n != 0:
                break
            if not b.reported:
                if out != NULL:
                    out[emitted] = completion_t(b.batch_id, b.status, b.index)
                    emitted += 1
                self.outstanding -= 1
            b.busy = False
            self._release_head()
        return emitted

    cdef int _poll_cq(self, completion_t* out, int cap) noexcept nogil:
        """Turn work completions into at most ``cap`` batch completions (all of them when
        ``out`` is NULL, dropping them); returns how many, or -1 when ibv_poll_cq fails.

        Work completions fetched but not yet turned into a batch completion (``out`` was
        full) stay in ``self.wcs`` for the next call, so batches come out in posting order.
        """
        cdef int emitted = 0
        cdef ibv_wc* wc
        cdef uint32_t slot, idx
        cdef batch_t* b
        while True:
            emitted = self._emit_unposted(out, emitted, cap)
            if out != NULL and emitted >= cap:
                return emitted
            if self.wc_next == self.wc_count:
                got = ibv_poll_cq(self.cq.cq, WC_CHUNK, self.wcs)
                if got <= 0:
                    return emitted if got == 0 or emitted else -1
                self.wc_next, self.wc_count = 0, got
            wc = &self.wcs[self.wc_next]
            self.wc_next += 1
            slot = <uint32_t>(wc.wr_id >> 32)
            idx = <uint32_t>wc.wr_id      # low 32 bits: op index
            if slot >= self.max_outstanding or not self.slots[slot].busy:
                continue   # left over from before a reset
            b = &self.slots[slot]
            if wc.status != IBV_WC_SUCCESS:
                self.broken = True   # the QP is in error: later work requests flush
            if not b.reported:
                if out != NULL:
                    out[emitted].batch_id = b.batch_id
                    out[emitted].status = wc.status if wc.status != IBV_WC_SUCCESS else b.status
                    out[emitted].index = idx if wc.status != IBV_WC_SUCCESS else b.index
                    emitted += 1
                b.reported = True
                self.outstanding -= 1
            if idx + 1 >= b.n:     # the batch's last work request: its slot is free
                b.busy = False
                self._release_head()

    def poll(self, out, timeout=None):
        """Fill ``out`` (writable COMPLETION_DTYPE array) with finished batches; return how many.

        Waits up to ``timeout`` seconds (None: until one arrives, 0: not at all): busy-polls
        briefly, then sleeps on the completion channel.  The GIL is released throughout.
        """
        cdef Py_buffer view
        cdef completion_t* c
        cdef int cap, n = 0, ev
        cdef uint64_t start, deadline = 0, spin_end, t
        cdef bint forever = timeout is None
        cdef int chunk_ms
        self._check()
        if not forever and timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        PyObject_GetBuffer(out, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
        try:
            if view.itemsize != sizeof(completion_t) or view.ndim != 1:
                raise ValueError(f"out must be a writable 1-D COMPLETION_DTYPE array (itemsize {sizeof(completion_t)})")
            cap = <int>min(view.shape[0], 1 << 30)
            if cap == 0:
                return 0
            c = <completion_t*>view.buf
            start = now_ns()
            if not forever:
                deadline = start + <uint64_t>(float(timeout) * 1e9)
            with nogil:
                n = self._poll_cq(c, cap)
                spin_end = start + SPIN_NS
                while n == 0 and (forever or now_ns() < deadline) and now_ns() < spin_end:
                    n = self._poll_cq(c, cap)
            while n == 0 and (forever or now_ns() < deadline):
                # arm, re-check (a completion may have landed before arming), then sleep
                if ibv_req_notify_cq(self.cq.cq, 0):
                    raise os_error("ibv_req_notify_cq", errno or _errno.EIO)
                ev = 0
                chunk_ms = 100
                if not forever:
                    t = now_ns()
                    chunk_ms = <int>min(<uint64_t>100, (deadline - t) // 1000000 + 1) if deadline > t else 0
                with nogil:
                    n = self._poll_cq(c, cap)
                    if n == 0:
                        ev = self.cq.wait_event(chunk_ms)
                        n = self._poll_cq(c, cap)
                if n < 0:
                    break
                if ev < 0:
                    raise os_error("waiting on the completion channel", -ev)
                PyErr_CheckSignals()
            if n < 0:
                raise os_error("ibv_poll_cq", errno or _errno.EIO)
            return n
        finally:
            PyBuffer_Release(&view)

    # -- the C core (ext/linkcore.pxd): the page store's request path, without the GIL --------

    def spin_counters(self):
        """The C core's completion waits: hits, misses, idle, preempted, probes, us polled,
        sleeps, small and large batches' summed."""
        return spin_pair_counters(self.spin)

    def c_interface(self):
        """A PyCapsule of this class's core_ops_t (ext/linkcore.pxd): the functions compiled code
        posts and polls this QP with, without the GIL (the QP itself is the ``core`` argument)."""
        return PyCapsule_New(<void*>&VERBS_CORE, core_ops_capsule(), NULL)

    cdef bint _c_idle(self) noexcept nogil:
        return self.qp != NULL and not self.broken and self.used == 0

    cdef int _c_post(self, const op_t* o, Py_ssize_t n, uint64_t batch_id) noexcept nogil:
        cdef Py_ssize_t where = 0
        cdef int rc
        if not self._c_idle() or n < 1 or n > self.max_batch:
            self.c_err = <int32_t>n
            return V_BAD_BATCH
        rc = self._post_batch(o, n, batch_id, &where)
        if rc == 0:
            return 0
        if rc == POST_BAD_OP:
            self.c_err = <int32_t>n
            return V_BAD_BATCH
        self.c_err = rc
        return V_POST_FAILED   # ops that went out are flushed by the caller's abandon

    cdef Py_ssize_t _c_poll(self, completion_t* out, int64_t deadline) noexcept nogil:
        """One batch completion into ``out`` by ``deadline``, waiting as ``poll`` does (spin, then
        sleep on the armed completion channel); a signal only shortens a sleep."""
        cdef int n, ev, chunk_ms
        cdef int64_t t = <int64_t>now_ns()
        cdef int64_t spin_end, last, budget
        cdef bint preempted = False
        cdef spin_t *sp = &self.spin[0]
        if self.qp == NULL:
            self.c_err = 0
            return V_POLL_FAILED
        if self.used:
            sp = spin_for_batch(self.spin, self.slots[self.head].n)  # the batch waited for: the oldest
        n = self._poll_cq(out, 1)
        if n == 0 and t < deadline:  # a wait: poll first while polling pays (ext/spin.pxd)
            # (under soft-RoCE the responder is the kernel on some CPU: our poll may be what
            # keeps it from running, and then it catches nothing)
            budget = spin_budget(sp)
            if budget > 0:
                spin_end = t + budget
                last = t
                while n == 0 and t < deadline and t < spin_end:
                    n = self._poll_cq(out, 1)
                    t = <int64_t>now_ns()
                    if t - last > SPIN_PREEMPT_NS:
                        preempted = True
                    last = t
                if n != 0 or t >= spin_end:  # (a deadline that cut the poll short says nothing)
                    spin_observe(sp, n > 0, preempted)
            if n == 0:
                sp.sleeps += 1
        while n == 0 and t < deadline:
            if ibv_req_notify_cq(self.cq.cq, 0):
                self.c_err = errno or EIO
                return V_POLL_FAILED
            n = self._poll_cq(out, 1)  # a completion may have landed before arming
            if n == 0:
                chunk_ms = <int>min(<int64_t>100, (deadline - t) // 1000000 + 1)
                ev = self.cq.wait_event(chunk_ms)
                if ev < 0:
                    self.c_err = -ev
                    return V_POLL_FAILED
                n = self._poll_cq(out, 1)
            t = <int64_t>now_ns()
        if n < 0:
            self.c_err = errno or EIO
            return V_POLL_FAILED
        return n

    cdef bint _c_abandon(self) noexcept nogil:
        """Give up on every batch in flight: the QP to the error state (late READ responses are
        dropped, the rest flushed), then wait up to DRAIN_NS until the last work request of each
        has completed (flushed or not).  True when nothing can land in a local buffer any more."""
        cdef ibv_qp_attr a
        cdef uint64_t deadline = now_ns() + DRAIN_NS
        cdef int spins = 0
        if self.qp == NULL:
            return True   # destroyed: the device is done with it
        memset(&a, 0, sizeof(a))
        a.qp_state = IBV_QPS_ERR
        if ibv_modify_qp(self.qp, &a, IBV_QP_STATE):
            self.c_err = errno or EIO
        self.broken = True   # recover() replaces it (Python, once it has suspended the link)
        while self.used and now_ns() < deadline:
            if self._poll_cq(NULL, 0) < 0:
                break
            spins += 1
            if spins > 100:
                usleep(20)
        return self.used == 0

    cdef int _destroy(self) except -1:
        if self.qp != NULL:
            rc = ibv_destroy_qp(self.qp)
            self.qp = NULL
            if rc:
                raise os_error("ibv_destroy_qp", rc)
        return 0

    def __dealloc__(self):
        if self.qp != NULL:
            ibv_destroy_qp(self.qp)
        free(self.wrs)
        free(self.sges)
        free(self.slots)
        free(self.locals_)


# -- the table of QP's C core (ext/linkcore.pxd), handed out by QP.c_interface() ------------------

cdef bint _core_idle(void* core) noexcept nogil:
    return (<QP>core)._c_idle()

cdef int _core_post(void* core, const op_t* o, Py_ssize_t n, uint64_t batch_id) noexcept nogil:
    return (<QP>core)._c_post(o, n, batch_id)

cdef Py_ssize_t _core_poll(void* core, completion_t* out, int64_t deadline) noexcept nogil:
    return (<QP>core)._c_poll(out, deadline)

cdef int32_t _core_detail(void* core) noexcept nogil:
    return (<QP>core).c_err

cdef bint _core_abandon(void* core) noexcept nogil:
    return (<QP>core)._c_abandon()

VERBS_CORE.kind = CORE_VERBS
VERBS_CORE.idle = _core_idle
VERBS_CORE.post = _core_post
VERBS_CORE.poll = _core_poll
VERBS_CORE.detail = _core_detail
VERBS_CORE.abandon = _core_abandon
