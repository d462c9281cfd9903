# The replica router of _storepath.pyx, declared for the page store's C request path
# (ext/_reqpath.pyx), which routes a request's remote READs with the same tables and choice
# (RemoteTier.router binds it; see Router in ext/_storepath.pyx).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from ops cimport op_t


cdef class Router:
    cdef int nrep
    cdef Py_ssize_t width
    cdef const int32_t *rep_link
    cdef const uint64_t *rep_addr
    cdef const uint32_t *rep_rkey
    cdef const uint8_t *rep_ready
    cdef int nlinks
    cdef uint8_t *alive
    cdef op_t **ops              # per link: its op array (RemoteTier._ops), filled by _read/_write
    cdef uint32_t *cap
    cdef uint32_t *count         # per link: ops written since _reset
    cdef int32_t *used           # the links written to since _reset, in order
    cdef int nused
    cdef list _keep

    cdef void _release(self)
    cdef void _reset(self) noexcept nogil
    cdef int _add(self, int li, uint8_t opcode, uint64_t laddr, uint64_t raddr, uint32_t length,
                  int64_t lkey, uint32_t rkey) noexcept nogil
    # one READ of the page at ``loc`` into ``dst`` from a ready replica on a live link; -1: none
    cdef int _read(self, uint64_t loc, uint64_t dst, const int64_t *lkeys) noexcept nogil
    cdef int _write(self, uint64_t loc, uint64_t src, const int64_t *lkeys) noexcept nogil
    cdef list _batches(self)
