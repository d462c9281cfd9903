# cython: language_level=3
"""NBD transmission fast path: a run of plain READs or WRITEs parsed and answered in C.

A queue-depth-32 client sends its requests back to back.  Decoding each 28-byte header into
a Python object, and packing each reply, would cost more than serving the pages.  A
RequestRun takes, in one call and without the GIL, the longest run of consecutive requests
at the head of the receive buffer that are all READ or all WRITE, whole 4 KiB blocks,
inside the export, with no flag other than FUA; a WRITE's payload is copied into the run's
page buffer.  Anything else (another command, a short or misaligned request, a payload not
yet received, a WRITE overlapping an earlier WRITE of the run) ends the run and is left for
the Python parser (rram.frontends.nbd.protocol), which owns every error reply.  So the run
changes no behaviour; it only skips the per-request Python work.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove

import numpy as np


cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)
    uint64_t be64toh(uint64_t)
    uint16_t htobe16(uint16_t)
    uint32_t htobe32(uint32_t)
    uint64_t htobe64(uint64_t)


cdef enum:
    PAGE = 4096
    PAGE_SHIFT = 12
    REQUEST_SIZE = 28
    SIMPLE_REPLY_SIZE = 16
    OFFSET_DATA_SIZE = 28
    REQUEST_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    STRUCTURED_REPLY_MAGIC = 0x668E33EF
    CMD_READ = 0
    CMD_WRITE = 1
    FLAG_FUA = 1
    REPLY_FLAG_DONE = 1
    REPLY_TYPE_OFFSET_DATA = 1


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return be16toh(v)


cdef inline uint32_t rd32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return be32toh(v)


cdef inline uint64_t rd64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return be64toh(v)


cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)


cdef inline void wr32(uint8_t *p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)


cdef inline void wr64(uint8_t *p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)


cdef class RequestRun:
    """Buffers for one connection's runs, allocated once: up to ``max_pages`` pages.

    After parse(): ``command`` (0 READ, 1 WRITE, -1 empty), ``nreq`` requests, ``npages``
    pages; ``pages[:npages]`` their block numbers in request order and ``data`` their bytes
    (a WRITE's payload, or where a READ's pages go); ``fua`` when any WRITE asked for it.
    """


    def __init__(self, int max_pages, bint structured):
        if max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {max_pages}")
        self.max_pages = max_pages
        self.structured = structured
        self.pages = np.zeros(max_pages, dtype=np.uint32)
        self.data = np.zeros(max_pages * PAGE, dtype=np.uint8)
        self._pages = self.pages
        self._data = self.data
        self._handles = np.zeros(max_pages, dtype=np.uint64)
        self._offsets = np.zeros(max_pages, dtype=np.uint64)
        self._lengths = np.zeros(max_pages, dtype=np.uint32)
        self._flags = np.zeros(max_pages, dtype=np.uint16)
        # replies: the larger header per request, plus every page once
        self._out = np.zeros(max_pages * (OFFSET_DATA_SIZE + PAGE), dtype=np.uint8)
        self.clear()

    def clear(self):
        self._clear()

    cdef void _clear(self) noexcept nogil:
        self.command = -1
        self.nreq = 0
        self.npages = 0
        self.fua = False

    def parse(self, uint8_t[::1] buf, Py_ssize_t start, Py_ssize_t end, uint64_t export_size,
              uint32_t max_block, uint32_t min_block):
        """Take the run at buf[start:end] (appending to this run); returns the new start."""
        if start < 0 or end > buf.shape[0] or start > end:
            raise ValueError(f"bad buffer range {start}..{end} of {buf.shape[0]}")
        if start == end:
            return start
        with nogil:
            start = self._parse(&buf[0], start, end, export_size, max_block, min_block)
        return start

    cdef Py_ssize_t _parse(self, const uint8_t *buf, Py_ssize_t start, Py_ssize_t end, uint64_t export_size,
                           uint32_t max_block, uint32_t min_block) noexcept nogil:
        cdef Py_ssize_t pos = start
        cdef uint64_t align = (min_block if min_block > PAGE else PAGE) - 1
        cdef const uint8_t *p
        cdef uint16_t flags, cmd
        cdef uint32_t length, n, i
        cdef uint64_t offset, first
        cdef int k
        while end - pos >= REQUEST_SIZE and self.nreq < self.max_pages:
            p = &buf[pos]
            if rd32(p) != REQUEST_MAGIC:
                break
            flags = rd16(p + 4)
            cmd = rd16(p + 6)
            offset = rd64(p + 16)
            length = rd32(p + 24)
            if cmd != CMD_READ and cmd != CMD_WRITE:
                break
            if self.command >= 0 and cmd != self.command:
                break
            if flags & ~FLAG_FUA or length == 0 or (offset | length) & align or length > max_block:
                break
            if offset > export_size or length > export_size - offset:
                break
            n = length >> PAGE_SHIFT
            if <uint64_t>self.npages + n > <uint64_t>self.max_pages:
                break
            if cmd == CMD_WRITE:
                if <uint64_t>(end - pos - REQUEST_SIZE) < length or self._overlaps(offset, length):
                    break
                memcpy(&self._data[self.npages * PAGE], p + REQUEST_SIZE, length)
            k = self.nreq
            self._handles[k] = rd64(p + 8)
            self._offsets[k] = offset
            self._lengths[k] = length
            self._flags[k] = flags
            first = offset >> PAGE_SHIFT
            for i in range(n):
                self._pages[self.npages + i] = <uint32_t>(first + i)
            self.command = cmd
            self.nreq += 1
            self.npages += n
            if flags & FLAG_FUA:
                self.fua = True
            pos += REQUEST_SIZE + (length if cmd == CMD_WRITE else 0)
        return pos

    cdef bint _overlaps(self, uint64_t offset, uint32_t length) noexcept nogil:
        # a run writes its pages in one store call, so it must not name a block twice
        cdef int k
        for k in range(self.nreq):
            if offset < self._offsets[k] + self._lengths[k] and self._offsets[k] < offset + length:
                return True
        return False

    def read_replies(self):
        """Every READ's reply (header, then its pages from ``data``) back to back; the bytes to send."""
        cdef Py_ssize_t pos
        with nogil:
            pos = self._read_replies()
        return memoryview(self._out)[:pos]

    cdef Py_ssize_t _read_replies(self) noexcept nogil:
        """read_replies into ``_out``; their size."""
        cdef Py_ssize_t pos = 0, page = 0
        cdef int k
        for k in range(self.nreq):
            pos += self._read_header(&self._out[pos], k)
            memcpy(&self._out[pos], &self._data[page], self._lengths[k])
            pos += self._lengths[k]
            page += self._lengths[k]
        return pos

    cdef Py_ssize_t _read_header(self, uint8_t *o, int k) noexcept nogil:
        """The reply header of READ k at ``o`` (its data follows); the header's size."""
        if self.structured:
            wr32(o, STRUCTURED_REPLY_MAGIC)
            wr16(o + 4, REPLY_FLAG_DONE)
            wr16(o + 6, REPLY_TYPE_OFFSET_DATA)
            wr64(o + 8, self._handles[k])
            wr32(o + 16, 8 + self._lengths[k])
            wr64(o + 20, self._offsets[k])
            return OFFSET_DATA_SIZE
        self._simple_reply(o, self._handles[k])
        return SIMPLE_REPLY_SIZE

    def write_replies(self):
        """One simple reply (no error) per WRITE; the bytes to send."""
        cdef Py_ssize_t size
        with nogil:
            size = self._write_replies(self.nreq)
        return memoryview(self._out)[:size]

    cdef Py_ssize_t _write_replies(self, int n) noexcept nogil:
        """The replies of the first ``n`` WRITEs into ``_out``; their size."""
        cdef int k
        for k in range(n):
            self._simple_reply(&self._out[k * SIMPLE_REPLY_SIZE], self._handles[k])
        return n * SIMPLE_REPLY_SIZE

    cdef void _simple_reply(self, uint8_t *o, uint64_t handle) noexcept nogil:
        wr32(o, SIMPLE_REPLY_MAGIC)
        wr32(o + 4, 0)
        wr64(o + 8, handle)

    def drop(self, int k):
        """_drop: tests."""
        if not 0 <= k <= self.nreq:
            raise IndexError(k)
        self._drop(k)

    cdef void _drop(self, int k) noexcept nogil:
        """Forget the first ``k`` requests (served already): the rest move to the front, as if
        parsed alone (a WRITE's payload with them)."""
        cdef Py_ssize_t skip = 0
        cdef int i
        if k <= 0:
            return
        for i in range(k):
            skip += self._lengths[i] >> PAGE_SHIFT
        self.nreq -= k
        self.npages -= <int>skip
        self.fua = False
        for i in range(self.nreq):
            self._handles[i] = self._handles[i + k]
            self._offsets[i] = self._offsets[i + k]
            self._lengths[i] = self._lengths[i + k]
            self._flags[i] = self._flags[i + k]
            if self._flags[i] & FLAG_FUA:
                self.fua = True
        if self.npages:
            memmove(&self._pages[0], &self._pages[skip], self.npages * sizeof(uint32_t))
            if self.command == CMD_WRITE:
                memmove(&self._data[0], &self._data[skip * PAGE], self.npages * PAGE)
        else:
            self.command = -1

    def request(self, int k):
        """Request k as (command, flags, handle, offset, length, data view or None): the
        one-by-one path, when the run as a whole failed."""
        if not 0 <= k < self.nreq:
            raise IndexError(k)
        cdef Py_ssize_t page = 0
        cdef int i
        for i in range(k):
            page += self._lengths[i]
        data = memoryview(self.data)[page:page + self._lengths[k]] if self.command == CMD_WRITE else None
        return (self.command, self._flags[k], self._handles[k], self._offsets[k], self._lengths[k], data)
