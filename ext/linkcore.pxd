# A link's requester core as the page store's C request path (ext/_reqpath.pyx) drives it: one
# READ batch posted, its completion polled until a deadline, and what to do when C gives up on
# it.  Each transport with a C core fills one table of these functions: tcp's is in _reqpath
# (over _tcpwire's WireRequester), verbs' in _verbs (over its QP, handed over in a PyCapsule so
# that _reqpath needs neither libibverbs to build nor _verbs to import).  All of them run without
# the GIL, under the store's lock, on a core no other thread uses meanwhile.
from libc.stdint cimport int32_t, int64_t, uint64_t

from ops cimport completion_t, op_t

cdef enum:
    CORE_TCP = 1
    CORE_VERBS = 2

# the PyCapsule name of a core_ops_t (verbs: QP.c_interface())
cdef inline const char *core_ops_capsule() noexcept nogil:
    return "rram.linkcore.core_ops_t"

ctypedef struct core_ops_t:
    int kind                                   # CORE_*: for diagnosis, never for dispatch
    # 1: connected, nothing in flight (a batch may be posted now); 0: busy or unusable
    bint (*idle)(void *core) noexcept nogil
    # queue and send/post ops[0:n] as batch ``batch_id``: 0, or a code < 0 (the link is unusable;
    # ``detail`` says more); never returns C_EINTR-like retries: it retries itself
    int (*post)(void *core, const op_t *ops, Py_ssize_t n, uint64_t batch_id) noexcept nogil
    # one completion into ``out``, waiting until ``deadline`` (ns, CLOCK_MONOTONIC): 1, 0 (timed
    # out) or a code < 0 (the link is unusable)
    Py_ssize_t (*poll)(void *core, completion_t *out, int64_t deadline) noexcept nogil
    # errno or the core's own detail of its last failure
    int32_t (*detail)(void *core) noexcept nogil
    # C gives up on what it posted (a timeout, an error): make sure none of it can land in the
    # local buffers later.  1 when that is certain now; 0 when it is not (the caller must not
    # reuse those buffers until Python has cut the link off them: remote.suspend)
    bint (*abandon)(void *core) noexcept nogil
