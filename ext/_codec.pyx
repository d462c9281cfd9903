"""Batch LZ4 codec for 4 KiB pages, on the system liblz4 (module ``rram._ext._codec``).

One call handles n pages with the GIL released, so a batch costs one Python call, not one
per page.  Stored image of a page, by its size:
  0           an all-zero page: nothing stored;
  4096        incompressible: stored raw;
  1..3584     an LZ4 block (no size header).
Callers use rram.datapath.codec, which falls back to python-lz4 with the same semantics.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

from liblz4 cimport (
    LZ4_compress_fast_continue,
    LZ4_decompress_safe,
    LZ4_initStream,
    LZ4_stream_t,
    LZ4_versionString,
)

from rram.errors import CorruptDataError

cdef enum:
    PAGE = 4096
    # Larger blocks save too little to be worth a decompression: such pages are stored raw.
    MAX_COMP = 3584

PAGE_SIZE = PAGE
MAX_COMPRESSED = MAX_COMP


def lz4_version():
    """The version of the liblz4 this module runs on, e.g. "1.9.4"."""
    return LZ4_versionString().decode()


cdef int acquire(object obj, Py_buffer* view, bint writable, str what) except -1:
    """Get a contiguous byte view of ``obj``; ValueError (not a crash) when it cannot be had."""
    cdef int flags = PyBUF_SIMPLE | (PyBUF_WRITABLE if writable else 0)
    try:
        PyObject_GetBuffer(obj, view, flags)
    except (BufferError, ValueError) as exc:
        kind = "a writable contiguous buffer" if writable else "a contiguous buffer"
        raise ValueError(f"{what} must be {kind}: {exc}") from exc
    return 0


cdef int check_count(Py_ssize_t n, Py_ssize_t have, str what) except -1:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if have < n:
        raise ValueError(f"{what} holds {have} entries, fewer than n={n}")
    return 0


cdef int check_bytes(Py_ssize_t n, Py_buffer* view, str what) except -1:
    if view.len < n * PAGE:
        raise ValueError(f"{what} has {view.len} bytes, fewer than n*4096 = {n * PAGE}")
    return 0


cdef inline bint page_is_zero(const uint8_t* p) noexcept nogil:
    # 64 bytes per step, OR-ed into one word: data pages exit on the first step,
    # zero pages cost one pass at memory speed. memcpy keeps unaligned buffers legal.
    cdef uint64_t w[8]
    cdef Py_ssize_t off
    for off in range(0, PAGE, 64):
        memcpy(w, p + off, 64)
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0:
            return False
    return True


cdef uint32_t compress_page(const uint8_t* page, uint8_t* out, int acceleration) noexcept nogil:
    """One page's stored image into ``out`` (room for 4096 bytes); its size (0, 4096 or an LZ4 block)."""
    cdef LZ4_stream_t stream
    cdef int got
    if page_is_zero(page):
        return 0
    # A fresh stream per page keeps pages independent; its 32-bit table hashes 5 bytes where
    # LZ4_compress_fast's 16-bit one for small inputs hashes 4, which packs heap-like pages ~10%
    # tighter. A capacity of MAX_COMP lets LZ4 give up early on incompressible data.
    LZ4_initStream(&stream, sizeof(stream))
    got = LZ4_compress_fast_continue(&stream, <const char*>page, <char*>out, PAGE, MAX_COMP, acceleration)
    if got <= 0:
        memcpy(out, page, PAGE)
        return PAGE
    return <uint32_t>got


def compress_pages(src, Py_ssize_t n, dst, uint32_t[:] sizes, int acceleration=1):
    """Compress n pages of ``src`` into ``dst`` at a 4096-byte stride; return the sum of sizes.

    ``sizes[i]`` becomes 0 (zero page, nothing written), 4096 (stored raw) or the LZ4 block
    length (<= MAX_COMPRESSED) of page i, whose image is ``dst[i*4096 : i*4096 + sizes[i]]``.
    """
    cdef Py_buffer s, d
    cdef Py_ssize_t i
    cdef uint64_t total = 0
    cdef uint32_t got
    check_count(n, sizes.shape[0], "sizes")
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    acquire(src, &s, False, "src")
    try:
        acquire(dst, &d, True, "dst")
        try:
            check_bytes(n, &s, "src")
            check_bytes(n, &d, "dst")
            with nogil:
                for i in range(n):
                    got = compress_page(<const uint8_t*>s.buf + i * PAGE, <uint8_t*>d.buf + i * PAGE, acceleration)
                    sizes[i] = got
                    total += got
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)
    return total


cdef int expand(const char* src, uint32_t size, char* out) noexcept nogil:
    """Write one page from its stored image; returns PAGE, or what LZ4 returned instead."""
    if size == 0:
        memset(out, 0, PAGE)
        return PAGE
    if size == PAGE:
        memcpy(out, src, PAGE)
        return PAGE
    return LZ4_decompress_safe(src, out, size, PAGE)


cdef object corrupt(Py_ssize_t index, uint32_t size, int got):
    if got < 0:
        why = f"malformed LZ4 block (error near input byte {-got})"
    else:
        why = f"decompressed to {got} bytes instead of 4096"
    return CorruptDataError(f"page {index} of the batch: its {size}-byte stored image is corrupt: {why}")


def decompress_pages(const uint64_t[:] src_addrs, const uint32_t[:] sizes, Py_ssize_t n, dst):
    """Expand n pages, page i read from raw address ``src_addrs[i]``, into ``dst[i*4096:]``.

    The caller guarantees each address is readable for ``sizes[i]`` bytes (the store's arenas).
    Raises CorruptDataError naming the first page that does not expand to exactly 4096 bytes.
    """
    cdef Py_buffer d
    cdef Py_ssize_t i, bad = -1
    cdef int got = PAGE
    check_count(n, src_addrs.shape[0], "src_addrs")
    check_count(n, sizes.shape[0], "sizes")
    with nogil:
        for i in range(n):
            if sizes[i] > PAGE or (sizes[i] != 0 and src_addrs[i] == 0):
                bad = i
                break
    if bad >= 0:
        raise ValueError(f"page {bad}: size {sizes[bad]} at address {src_addrs[bad]:#x} is not a stored page image")
    acquire(dst, &d, True, "dst")
    try:
        check_bytes(n, &d, "dst")
        with nogil:
            for i in range(n):
                got = expand(<const char*><uintptr_t>src_addrs[i], sizes[i], <char*>d.buf + i * PAGE)
                if got != PAGE:
                    bad = i
                    break
    finally:
        PyBuffer_Release(&d)
    if bad >= 0:
        raise corrupt(bad, sizes[bad], got)


def decompress_buffer(src, const uint64_t[:] offsets, const uint32_t[:] sizes, Py_ssize_t n, dst):
    """Like decompress_pages, page i read from ``src[offsets[i] : offsets[i] + sizes[i]]``.

    Every range is checked against ``len(src)`` first (ValueError), so bad offsets never
    read outside the buffer.
    """
    cdef Py_buffer s, d
    cdef Py_ssize_t i, bad = -1
    cdef int got = PAGE
    cdef uint64_t limit
    check_count(n, offsets.shape[0], "offsets")
    check_count(n, sizes.shape[0], "sizes")
    acquire(src, &s, False, "src")
    try:
        limit = <uint64_t>s.len
        with nogil:
            for i in range(n):
                if sizes[i] > PAGE or offsets[i] > limit or sizes[i] > limit - offsets[i]:
                    bad = i
                    break
        if bad >= 0:
            raise ValueError(f"page {bad}: size {sizes[bad]} at offset {offsets[bad]} does not fit "
                             f"a stored page image inside the {s.len}-byte source buffer")
        acquire(dst, &d, True, "dst")
        try:
            check_bytes(n, &d, "dst")
            with nogil:
                for i in range(n):
                    got = expand(<const char*>s.buf + offsets[i], sizes[i], <char*>d.buf + i * PAGE)
                    if got != PAGE:
                        bad = i
                        break
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)
    if bad >= 0:
        raise corrupt(bad, sizes[bad], got)
