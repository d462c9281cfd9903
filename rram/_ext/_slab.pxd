# Declarations of the slot allocator (_slab.pyx), so that other compiled modules (the request
# path, ext/_reqpath.pyx) allocate and free single slots through its C methods.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t

cdef enum:
    NCLASSES = 65              # c*64 bytes; 65 holds a sealed raw page (4112 bytes)
    BITMAP_WORDS = 16
    E_OK = 0                   # free() failure reasons (reported with the index of the bad location)
    E_KIND = 1
    E_SLAB = 2
    E_BLOCK = 3
    E_SLOT = 4
    E_SIZE = 5
    E_DOUBLE = 6
    E_NOMEM = 7


cdef struct block_t:
    uint64_t freebits[BITMAP_WORDS]   # 1 = free slot
    void *info                        # one allocation holding the two arrays below
    uint64_t *owners                  # nslots owner keys (track_owners only, else NULL)
    uint16_t *sizes                   # nslots stored sizes (victims need the exact location)
    int32_t next                      # links: class partial list, or the slab's free stack
    int32_t prev
    uint16_t used
    uint16_t nslots
    uint8_t cls                       # 0: free block
    uint8_t where                     # ON_*
    uint8_t hint                      # lowest bitmap word that may hold a free bit


cdef struct slab_t:
    block_t *blocks
    uint64_t size
    uint64_t seq                      # add order
    uint64_t slots_used
    uint64_t slot_bytes               # bytes of allocated slots (class sizes)
    uint64_t stored_bytes             # sum of the stored sizes
    uint32_t id                       # 0: unused table entry
    int32_t nblocks
    int32_t fresh                     # blocks >= fresh were never handed out
    int32_t free_head                 # stack of returned blocks (global ids)
    int32_t free_count                # returned + never handed out
    int32_t used_blocks
    int32_t next_avail                # list of slabs with free blocks, by seq
    int32_t prev_avail
    uint8_t retired
    uint8_t avail



cdef class SlotAllocator:
    cdef slab_t *slabs
    cdef int32_t nslabs                       # table entries in use (some may be removed)
    cdef int32_t slab_cap
    cdef int32_t *idmap[4096]
    cdef int32_t partial_head[NCLASSES + 1]
    cdef int32_t partial_tail[NCLASSES + 1]
    cdef int64_t class_blocks[NCLASSES + 1]
    cdef int32_t avail_head
    cdef int32_t avail_tail
    cdef uint64_t next_seq
    cdef int32_t hand_slab
    cdef int32_t hand_block
    cdef int32_t hand_slot
    cdef int64_t total_blocks
    cdef readonly bint track_owners
    cdef bint busy

    cdef block_t *_blk(self, int32_t gid) noexcept nogil
    cdef int32_t _index_of(self, uint64_t slab_id) noexcept nogil
    cdef void _partial_push(self, int c, int32_t gid) noexcept nogil
    cdef void _partial_remove(self, int c, int32_t gid) noexcept nogil
    cdef void _avail_insert(self, int32_t s) noexcept nogil
    cdef void _avail_remove(self, int32_t s) noexcept nogil
    cdef int32_t _new_block(self, int c) noexcept nogil
    cdef void _release_block(self, int32_t gid) noexcept nogil
    cdef uint64_t _alloc_one(self, uint32_t size, uint64_t owner, int *err) noexcept nogil
    cdef int _alloc_batch(self, const uint32_t[:] sizes, uint64_t[:] out, const uint64_t[:] owners,
                          bint with_owners, Py_ssize_t n, Py_ssize_t *done) noexcept nogil
    cdef int _decode(self, uint64_t loc, int32_t *gid_out, int *slot_out) noexcept nogil
    cdef int _mark_free(self, uint64_t loc) noexcept nogil
    cdef void _account_free(self, uint64_t loc) noexcept nogil
    cdef int _free_one(self, uint64_t loc) noexcept nogil
    cdef int _owner(self, uint64_t loc, uint64_t *out) noexcept nogil
    cdef int _free_batch(self, const uint64_t[:] locs, Py_ssize_t n, Py_ssize_t *bad) noexcept nogil
    cdef Py_ssize_t _pick(self, Py_ssize_t max_n, uint64_t[:] out_locs, uint64_t[:] out_owners,
                          bint with_owners) noexcept nogil
    cdef _enter(self)
    cdef _grow(self)
    cdef int32_t _require(self, slab_id) except -2
    cdef list _by_seq(self)
