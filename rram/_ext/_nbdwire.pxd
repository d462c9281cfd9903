# The NBD run parser (ext/_nbdwire.pyx), declared for _nbdserve, which answers a parsed
# request through the page store's C request path.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef class RequestRun:
    cdef readonly int command, nreq, npages, max_pages
    cdef readonly bint fua, structured
    cdef readonly object pages, data
    cdef uint32_t[::1] _pages
    cdef uint8_t[::1] _data
    cdef uint64_t[::1] _handles, _offsets
    cdef uint32_t[::1] _lengths
    cdef uint16_t[::1] _flags
    cdef uint8_t[::1] _out

    cdef void _clear(self) noexcept nogil
    cdef Py_ssize_t _parse(self, const uint8_t *buf, Py_ssize_t start, Py_ssize_t end, uint64_t export_size,
                           uint32_t max_block, uint32_t min_block) noexcept nogil
    cdef bint _overlaps(self, uint64_t offset, uint32_t length) noexcept nogil
    cdef Py_ssize_t _read_header(self, uint8_t *o, int k) noexcept nogil
    cdef Py_ssize_t _read_replies(self) noexcept nogil
    cdef Py_ssize_t _write_replies(self, int n) noexcept nogil
    cdef void _drop(self, int k) noexcept nogil
    cdef void _simple_reply(self, uint8_t *o, uint64_t handle) noexcept nogil
