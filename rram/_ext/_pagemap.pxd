# Declarations of the page map (_pagemap.pyx), so that other compiled modules (the request
# path, ext/_reqpath.pyx) call its C methods directly, without Python objects in between.
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    CHUNK_BITS = 9
    CHUNK_SLOTS = 512
    NPOOLS = 256


cdef struct chunk_t:
    uint64_t no                        # key >> 9
    chunk_t *next                      # in its object's list
    chunk_t *prev
    obj_t *obj
    uint32_t count                     # non-zero entries
    uint64_t vals[CHUNK_SLOTS]


cdef struct obj_t:
    uint64_t no                        # key >> 32
    chunk_t *chunks
    obj_t *next                        # in its pool's list
    obj_t *prev
    uint64_t nchunks


cdef struct table_t:
    uint64_t *keys                     # EMPTY marks a free slot
    void **vals
    uint64_t mask
    uint64_t count
    int shift


cdef class PageMap:
    cdef table_t chunks
    cdef table_t objects
    cdef obj_t *pools[NPOOLS]
    cdef chunk_t *last                 # one-entry cache: batches are mostly sequential keys
    cdef uint64_t entries
    cdef uint64_t nobjects
    cdef bint busy

    cdef chunk_t *_find(self, uint64_t cno) noexcept nogil
    cdef chunk_t *_make(self, uint64_t cno) noexcept nogil
    cdef void _drop_object_if_empty(self, obj_t *ob) noexcept nogil
    cdef void _drop(self, chunk_t *ch) noexcept nogil
    # one key: its location (0 absent); _set stores (0 removes) and returns the previous one
    cdef uint64_t _get(self, uint64_t key) noexcept nogil
    cdef uint64_t _set(self, uint64_t key, uint64_t loc, bint *nomem) noexcept nogil
    cdef _enter(self)
    @staticmethod
    cdef _check_len(str what, Py_ssize_t have, Py_ssize_t n)
    cdef Py_ssize_t _chunks_in_range(self, uint64_t lo, uint64_t last, chunk_t **out) noexcept nogil
    cdef Py_ssize_t _collect(self, obj_t *ob, uint64_t clo, uint64_t chi, chunk_t **out,
                             Py_ssize_t n) noexcept nogil
