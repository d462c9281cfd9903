# The one-page codec steps of _codec.pyx, for compiled callers (the request path, ext/_reqpath.pyx).
from libc.stdint cimport uint8_t, uint32_t

# a page's stored image into out (room for 4096 bytes): its size, 0 (zero page), 4096 (raw) or an LZ4 block
cdef uint32_t compress_page(const uint8_t* page, uint8_t* out, int acceleration) noexcept nogil
# a page (4096 bytes) from its stored image: returns 4096, or what LZ4 returned instead (corrupt image)
cdef int expand(const char* src, uint32_t size, char* out) noexcept nogil
