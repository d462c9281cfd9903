# cython: language_level=3
"""Size-class slot allocator: page locations in slabs, in batches, without per-page Python objects.

A slab (1..2**24-1, up to 256 MiB) is cut into 64 KiB blocks.  A block in use serves one size
class c (1..64): 1024 // c slots of c*64 bytes, with a free bitmap.  Blocks with a free slot sit
on their class's list (intrusive, in C arrays); full blocks sit on no list; fully free blocks go
back to their slab and may serve another class next time.  New blocks come from the oldest slab
(add order) that has one, so younger slabs drain and can be returned; retired slabs never give
new blocks nor take new slots.

Locations follow ext/location.pxd (the layout, declared once for every compiled user).

Not thread-safe (the page store holds a lock); overlapping calls raise RramError rather than
corrupt the tables.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset

import operator

from rram.errors import NotFound, RramError

from location cimport (
    GRANULE, KIND_MASK, KIND_STORED, LOC_BITS, MAX_STORED_SIZE, SLAB_FIELD, location_layout, loc_granule, loc_pack,
    loc_size, loc_slab,
)

cdef extern from *:
    """
    static inline int rram_slab_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    """
    int ctz64 "rram_slab_ctz64"(unsigned long long x) noexcept nogil

#: the layout this module was built with (rram/datapath/slab.py takes its constants from here)
LAYOUT = location_layout()

# geometry
cdef enum:
    BLOCK_SIZE = 65536
    BLOCK_GRANULES = 1024
    BLOCK_BITS = 12            # a global block id is slab_index << 12 | block
    MAX_BLOCKS = 4096          # per slab (256 MiB)
    NIL = -1
    IDMAP_BITS = 12            # slab id -> index: two-level table of 4096 x 4096

# where a block is linked
cdef enum:
    ON_NONE = 0                # full, or partial in a retired slab
    ON_PARTIAL = 1
    ON_FREE = 2

# free() failure reasons (E_OK, E_KIND...) are declared in _slab.pxd
_REASONS = {
    E_KIND: "is not a page location (bad kind or high bits)",
    E_SLAB: "names a slab this allocator does not have",
    E_BLOCK: "points into a block with no allocated slots (double free?)",
    E_SLOT: "is not the start of a slot",
    E_SIZE: "has a size other than the one allocated in its slot",
    E_DOUBLE: "is not allocated (double free?)",
}

MAX_SLAB_SIZE = MAX_BLOCKS * BLOCK_SIZE
MAX_SLAB_ID = SLAB_FIELD


cdef class SlotAllocator:
    """Slots of 64-byte multiples in 64 KiB blocks of slabs; batch alloc/free of locations.

    ``track_owners=True`` keeps an 8-byte owner (the page key) per allocated slot, returned by
    :meth:`pick_victims` and :meth:`owners`.
    """


    def __cinit__(self, bint track_owners=False):
        cdef int c
        self.track_owners = track_owners
        self.slabs = NULL
        self.nslabs = 0
        self.slab_cap = 0
        memset(self.idmap, 0, sizeof(self.idmap))
        for c in range(NCLASSES + 1):
            self.partial_head[c] = NIL
            self.partial_tail[c] = NIL
            self.class_blocks[c] = 0
        self.avail_head = NIL
        self.avail_tail = NIL
        self.next_seq = 1
        self.hand_slab = 0
        self.hand_block = 0
        self.hand_slot = 0
        self.total_blocks = 0
        self.busy = False

    def __dealloc__(self):
        cdef int32_t s, b
        cdef int i
        for s in range(self.nslabs):
            if self.slabs[s].blocks != NULL:
                for b in range(self.slabs[s].fresh):
                    free(self.slabs[s].blocks[b].info)
                free(self.slabs[s].blocks)
        free(self.slabs)
        for i in range(4096):
            free(self.idmap[i])

    # -- small C helpers --------------------------------------------------------------------

    cdef block_t *_blk(self, int32_t gid) noexcept nogil:
        return &self.slabs[gid >> BLOCK_BITS].blocks[gid & (MAX_BLOCKS - 1)]

    cdef int32_t _index_of(self, uint64_t slab_id) noexcept nogil:
        cdef int32_t *page
        if slab_id == 0 or slab_id > SLAB_FIELD:
            return NIL
        page = self.idmap[slab_id >> IDMAP_BITS]
        if page == NULL:
            return NIL
        return page[slab_id & ((1 << IDMAP_BITS) - 1)]

    cdef void _partial_push(self, int c, int32_t gid) noexcept nogil:
        """Push at the head: a block that was full has one free slot, so filling it first keeps
        blocks dense (and a new block is only taken when the list is empty)."""
        cdef block_t *b = self._blk(gid)
        b.where = ON_PARTIAL
        b.prev = NIL
        b.next = self.partial_head[c]
        if b.next != NIL:
            self._blk(b.next).prev = gid
        else:
            self.partial_tail[c] = gid
        self.partial_head[c] = gid

    cdef void _partial_remove(self, int c, int32_t gid) noexcept nogil:
        cdef block_t *b = self._blk(gid)
        if b.prev != NIL:
            self._blk(b.prev).next = b.next
        else:
            self.partial_head[c] = b.next
        if b.next != NIL:
            self._blk(b.next).prev = b.prev
        else:
            self.partial_tail[c] = b.prev
        b.where = ON_NONE
        b.next = NIL
        b.prev = NIL

    cdef void _avail_insert(self, int32_t s) noexcept nogil:
        """Link slab s into the list of slabs with free blocks, keeping add order."""
        cdef slab_t *sl = &self.slabs[s]
        cdef int32_t after = self.avail_tail
        while after != NIL and self.slabs[after].seq > sl.seq:
            after = self.slabs[after].prev_avail
        sl.prev_avail = after
        if after == NIL:
            sl.next_avail = self.avail_head
            self.avail_head = s
        else:
            sl.next_avail = self.slabs[after].next_avail
            self.slabs[after].next_avail = s
        if sl.next_avail == NIL:
            self.avail_tail = s
        else:
            self.slabs[sl.next_avail].prev_avail = s
        sl.avail = 1

    cdef void _avail_remove(self, int32_t s) noexcept nogil:
        cdef slab_t *sl = &self.slabs[s]
        if not sl.avail:
            return
        if sl.prev_avail != NIL:
            self.slabs[sl.prev_avail].next_avail = sl.next_avail
        else:
            self.avail_head = sl.next_avail
        if sl.next_avail != NIL:
            self.slabs[sl.next_avail].prev_avail = sl.prev_avail
        else:
            self.avail_tail = sl.prev_avail
        sl.avail = 0
        sl.next_avail = NIL
        sl.prev_avail = NIL

    cdef int32_t _new_block(self, int c) noexcept nogil:
        """A free block from the oldest slab that has one, set up for class c; NIL if none, -2 on ENOMEM."""
        cdef int32_t s = self.avail_head
        cdef int32_t gid
        cdef slab_t *sl
        cdef block_t *b
        cdef int w, nslots
        if s == NIL:
            return NIL
        sl = &self.slabs[s]
        nslots = BLOCK_GRANULES // c
        if sl.free_head != NIL:
            gid = sl.free_head
        else:
            gid = (s << BLOCK_BITS) | sl.fresh
        b = self._blk(gid)
        b.info = malloc(nslots * (sizeof(uint16_t) + (sizeof(uint64_t) if self.track_owners else 0)))
        if b.info == NULL:
            return -2
        if self.track_owners:
            b.owners = <uint64_t *>b.info
            b.sizes = <uint16_t *>(b.owners + nslots)
        else:
            b.owners = NULL
            b.sizes = <uint16_t *>b.info
        if gid == sl.free_head:
            sl.free_head = b.next
        else:
            sl.fresh += 1
        sl.free_count -= 1
        if sl.free_count == 0:
            self._avail_remove(s)
        for w in range(BITMAP_WORDS):
            if nslots >= (w + 1) * 64:
                b.freebits[w] = <uint64_t>-1
            elif nslots > w * 64:
                b.freebits[w] = ((<uint64_t>1) << (nslots - w * 64)) - 1
            else:
                b.freebits[w] = 0
        b.cls = c
        b.nslots = nslots
        b.used = 0
        b.hint = 0
        sl.used_blocks += 1
        self.class_blocks[c] += 1
        self._partial_push(c, gid)
        return gid

    cdef void _release_block(self, int32_t gid) noexcept nogil:
        """Give an empty block back to its slab."""
        cdef int32_t s = gid >> BLOCK_BITS
        cdef slab_t *sl = &self.slabs[s]
        cdef block_t *b = self._blk(gid)
        if b.where == ON_PARTIAL:
            self._partial_remove(b.cls, gid)
        self.class_blocks[b.cls] -= 1
        free(b.info)
        b.info = NULL
        b.owners = NULL
        b.sizes = NULL
        b.cls = 0
        b.nslots = 0
        b.where = ON_FREE
        b.prev = NIL
        b.next = sl.free_head
        sl.free_head = gid
        sl.free_count += 1
        sl.used_blocks -= 1
        if not sl.retired and not sl.avail:
            self._avail_insert(s)

    cdef uint64_t _alloc_one(self, uint32_t size, uint64_t owner, int *err) noexcept nogil:
        """One slot of ``size`` bytes (1..MAX_STORED_SIZE) owned by ``owner`` (kept when tracking owners):
        its location, or 0 with ``err`` E_OK (no room) or E_NOMEM."""
        cdef int c = (size + GRANULE - 1) // GRANULE
        cdef int w, bit, slot
        cdef int32_t gid = self.partial_head[c]
        cdef block_t *b
        cdef slab_t *sl
        cdef uint64_t granule
        if gid == NIL:
            gid = self._new_block(c)
            if gid < 0:
                err[0] = E_NOMEM if gid == -2 else E_OK
                return 0
        b = self._blk(gid)
        w = b.hint
        while b.freebits[w] == 0:
            w += 1
        bit = ctz64(b.freebits[w])
        b.freebits[w] &= b.freebits[w] - 1
        b.hint = w
        slot = w * 64 + bit
        b.used += 1
        if b.used == b.nslots:
            self._partial_remove(c, gid)
        b.sizes[slot] = <uint16_t>size
        if self.track_owners:
            b.owners[slot] = owner
        sl = &self.slabs[gid >> BLOCK_BITS]
        sl.slots_used += 1
        sl.slot_bytes += c * GRANULE
        sl.stored_bytes += size
        granule = <uint64_t>(gid & (MAX_BLOCKS - 1)) * BLOCK_GRANULES + <uint64_t>slot * c
        return loc_pack(sl.id, granule, size)

    cdef int _alloc_batch(self, const uint32_t[:] sizes, uint64_t[:] out, const uint64_t[:] owners,
                          bint with_owners, Py_ssize_t n, Py_ssize_t *done) noexcept nogil:
        cdef Py_ssize_t i
        cdef int err = E_OK
        cdef uint64_t loc
        for i in range(n):
            loc = self._alloc_one(sizes[i], owners[i] if with_owners else 0, &err)
            if loc == 0:
                done[0] = i
                return err
            out[i] = loc
        done[0] = n
        return E_OK

    cdef int _decode(self, uint64_t loc, int32_t *gid_out, int *slot_out) noexcept nogil:
        """Find the slot of a stored location; E_OK or the reason it is not a valid slot start."""
        cdef int32_t s
        cdef slab_t *sl
        cdef block_t *b
        cdef uint64_t granule, size
        cdef int32_t bi
        cdef int g, c
        if (loc & KIND_MASK) != KIND_STORED or (loc >> LOC_BITS) != 0:
            return E_KIND
        s = self._index_of(loc_slab(loc))
        if s == NIL:
            return E_SLAB
        sl = &self.slabs[s]
        granule = loc_granule(loc)
        bi = <int32_t>(granule >> 10)
        if bi >= sl.fresh:
            return E_BLOCK
        b = &sl.blocks[bi]
        c = b.cls
        if c == 0:
            return E_BLOCK
        g = <int>(granule & (BLOCK_GRANULES - 1))
        if g % c != 0 or g // c >= b.nslots:
            return E_SLOT
        size = loc_size(loc)
        if size == 0 or size > MAX_STORED_SIZE or <int>((size + GRANULE - 1) // GRANULE) != c:
            return E_SIZE
        gid_out[0] = (s << BLOCK_BITS) | bi
        slot_out[0] = g // c
        return E_OK

    cdef int _mark_free(self, uint64_t loc) noexcept nogil:
        """Check that ``loc`` is an allocated slot and set its free bit: E_OK or the reason not."""
        cdef int32_t gid
        cdef int slot
        cdef uint64_t bitmask
        cdef block_t *b
        cdef int err = self._decode(loc, &gid, &slot)
        if err != E_OK:
            return err
        b = self._blk(gid)
        bitmask = (<uint64_t>1) << (slot & 63)
        if b.freebits[slot >> 6] & bitmask:
            return E_DOUBLE
        if b.sizes[slot] != loc_size(loc):
            return E_SIZE
        b.freebits[slot >> 6] |= bitmask
        return E_OK

    cdef void _account_free(self, uint64_t loc) noexcept nogil:
        """The bookkeeping of freeing ``loc``, whose free bit _mark_free has set."""
        cdef int32_t gid
        cdef int slot, c
        cdef block_t *b
        cdef slab_t *sl
        self._decode(loc, &gid, &slot)
        b = self._blk(gid)
        sl = &self.slabs[gid >> BLOCK_BITS]
        c = b.cls
        if (slot >> 6) < b.hint:
            b.hint = slot >> 6
        if b.owners != NULL:
            b.owners[slot] = 0
        sl.slots_used -= 1
        sl.slot_bytes -= c * GRANULE
        sl.stored_bytes -= loc_size(loc)
        b.used -= 1
        if b.used == 0:
            self._release_block(gid)
        elif b.used == b.nslots - 1 and not sl.retired:
            self._partial_push(c, gid)

    cdef int _free_one(self, uint64_t loc) noexcept nogil:
        """Free one stored location (absent and zero locations are no-ops): E_OK or the reason not."""
        cdef int err
        if (loc & KIND_MASK) < KIND_STORED:
            return E_OK
        err = self._mark_free(loc)
        if err == E_OK:
            self._account_free(loc)
        return err

    cdef int _free_batch(self, const uint64_t[:] locs, Py_ssize_t n, Py_ssize_t *bad) noexcept nogil:
        """All or nothing: pass 1 checks every location and marks its bit free (undone on error),
        pass 2 does the accounting and moves blocks between lists."""
        cdef Py_ssize_t i, j
        cdef int32_t gid
        cdef int slot, err
        for i in range(n):
            if (locs[i] & KIND_MASK) < KIND_STORED:
                continue
            err = self._mark_free(locs[i])
            if err != E_OK:
                for j in range(i):
                    if (locs[j] & KIND_MASK) == KIND_STORED:
                        self._decode(locs[j], &gid, &slot)
                        self._blk(gid).freebits[slot >> 6] &= ~((<uint64_t>1) << (slot & 63))
                bad[0] = i
                return err
        for i in range(n):
            if (locs[i] & KIND_MASK) == KIND_STORED:
                self._account_free(locs[i])
        return E_OK

    cdef Py_ssize_t _pick(self, Py_ssize_t max_n, uint64_t[:] out_locs, uint64_t[:] out_owners,
                          bint with_owners) noexcept nogil:
        """Clock over blocks: emit allocated slots from the hand onwards, at most one lap.

        The hand moves through positions: each handed-out block of each slab, an end-of-slab
        position per slab, and one wrap position.  After a full lap (``lap`` steps) it is back
        where it started and only takes the slots it skipped then, so no slot comes out twice.
        """
        cdef Py_ssize_t got = 0
        cdef int64_t step, lap = 1
        cdef int32_t s
        cdef int start_slot = self.hand_slot
        cdef int slot, end, c
        cdef slab_t *sl
        cdef block_t *b
        cdef uint64_t granule
        for s in range(self.nslabs):
            lap += (self.slabs[s].fresh + 1) if self.slabs[s].id != 0 else 1
        if self.hand_slab > self.nslabs:
            self.hand_slab = self.nslabs
        for step in range(lap + 1):
            if got >= max_n:
                break
            if self.hand_slab == self.nslabs:
                self.hand_slab = 0
                self.hand_block = 0
                self.hand_slot = 0
                continue
            sl = &self.slabs[self.hand_slab]
            if sl.id == 0 or self.hand_block >= sl.fresh:
                self.hand_slab += 1
                self.hand_block = 0
                self.hand_slot = 0
                continue
            b = &sl.blocks[self.hand_block]
            c = b.cls
            if c != 0 and b.used > 0:
                end = b.nslots if step < lap else min(<int>b.nslots, start_slot)
                slot = self.hand_slot
                while slot < end and got < max_n:
                    if not (b.freebits[slot >> 6] >> (slot & 63)) & 1:
                        granule = <uint64_t>self.hand_block * BLOCK_GRANULES + <uint64_t>slot * c
                        out_locs[got] = loc_pack(sl.id, granule, b.sizes[slot])
                        if with_owners:
                            out_owners[got] = b.owners[slot] if b.owners != NULL else 0
                        got += 1
                    slot += 1
                if slot < b.nslots:
                    self.hand_slot = slot
                    return got
            self.hand_block += 1
            self.hand_slot = 0
        return got

    # -- Python API -------------------------------------------------------------------------

    cdef _enter(self):
        if self.busy:
            raise RramError("SlotAllocator used from two threads at once (it is not thread-safe)")
        self.busy = True

    def add_slab(self, slab_id: int, size: int) -> None:
        """Add a slab of ``size`` bytes (a multiple of 64 KiB, at most 256 MiB) under ``slab_id``."""
        cdef int32_t s, i
        cdef slab_t *sl
        cdef int32_t *page
        if not 1 <= slab_id <= MAX_SLAB_ID:
            raise ValueError(f"slab id {slab_id} out of range 1..{MAX_SLAB_ID}")
        if size <= 0 or size % BLOCK_SIZE or size > MAX_SLAB_SIZE:
            raise ValueError(f"slab size {size} must be a positive multiple of {BLOCK_SIZE} up to {MAX_SLAB_SIZE}")
        if self._index_of(slab_id) != NIL:
            raise RramError(f"slab {slab_id} is already in this allocator")
        self._enter()
        try:
            page = self.idmap[slab_id >> IDMAP_BITS]
            if page == NULL:
                page = <int32_t *>malloc((1 << IDMAP_BITS) * sizeof(int32_t))
                if page == NULL:
                    raise MemoryError()
                for i in range(1 << IDMAP_BITS):
                    page[i] = NIL
                self.idmap[slab_id >> IDMAP_BITS] = page
            s = 0
            while s < self.nslabs and self.slabs[s].id != 0:
                s += 1
            if s == self.nslabs:
                if s >= (1 << (31 - BLOCK_BITS)):
                    raise RramError("too many slabs in one allocator")
                if s == self.slab_cap:
                    self._grow()
                self.nslabs += 1
            sl = &self.slabs[s]
            memset(sl, 0, sizeof(slab_t))
            sl.blocks = <block_t *>calloc(size // BLOCK_SIZE, sizeof(block_t))
            if sl.blocks == NULL:
                if s == self.nslabs - 1:
                    self.nslabs -= 1
                raise MemoryError(f"no memory for the block table of a {size}-byte slab")
            sl.id = slab_id
            sl.size = size
            sl.seq = self.next_seq
            self.next_seq += 1
            sl.nblocks = size // BLOCK_SIZE
            sl.free_count = sl.nblocks
            sl.free_head = NIL
            sl.next_avail = NIL
            sl.prev_avail = NIL
            page[slab_id & ((1 << IDMAP_BITS) - 1)] = s
            self.total_blocks += sl.nblocks
            self._avail_insert(s)
        finally:
            self.busy = False

    cdef _grow(self):
        cdef int32_t cap = max(8, self.slab_cap * 2)
        cdef slab_t *bigger = <slab_t *>realloc(self.slabs, cap * sizeof(slab_t))
        if bigger == NULL:
            raise MemoryError()
        self.slabs = bigger
        self.slab_cap = cap

    cdef int32_t _require(self, slab_id) except -2:
        try:
            sid = operator.index(slab_id)
        except TypeError:
            raise TypeError(f"slab id must be an integer, got {slab_id!r}") from None
        if not 1 <= sid <= MAX_SLAB_ID:
            raise NotFound(f"slab {slab_id} is not in this allocator")
        cdef int32_t s = self._index_of(sid)
        if s == NIL:
            raise NotFound(f"slab {slab_id} is not in this allocator")
        return s

    def retire_slab(self, slab_id: int) -> None:
        """Stop placing anything in ``slab_id``; its slots stay valid until freed. Idempotent."""
        cdef int32_t s = self._require(slab_id)
        cdef int32_t b
        cdef slab_t *sl = &self.slabs[s]
        self._enter()
        sl.retired = 1
        self._avail_remove(s)
        for b in range(sl.fresh):
            if sl.blocks[b].where == ON_PARTIAL:
                self._partial_remove(sl.blocks[b].cls, (s << BLOCK_BITS) | b)
        self.busy = False

    def remove_slab(self, slab_id: int) -> None:
        """Forget an empty slab (RramError while any slot in it is allocated)."""
        cdef int32_t s = self._require(slab_id)
        cdef slab_t *sl = &self.slabs[s]
        if sl.slots_used:
            raise RramError(f"slab {slab_id} still holds {sl.slots_used} allocated slots")
        self._enter()
        self._avail_remove(s)
        self.total_blocks -= sl.nblocks
        free(sl.blocks)
        sl.blocks = NULL
        sl.id = 0
        sl.fresh = 0
        self.idmap[slab_id >> IDMAP_BITS][slab_id & ((1 << IDMAP_BITS) - 1)] = NIL
        if self.hand_slab == s:
            self.hand_block = 0
            self.hand_slot = 0
        self.busy = False

    def alloc(self, const uint32_t[:] sizes, uint64_t[:] out_locs, const uint64_t[:] owners=None,
              Py_ssize_t n=-1) -> int:
        """Allocate slots for sizes[:n] in order into out_locs[:n]; stops at the first that does
        not fit and returns how many were allocated.  ``owners`` (the page keys) is required when
        tracking owners and ignored otherwise.  A size outside 1..MAX_STORED_SIZE raises ValueError and
        allocates nothing."""
        cdef Py_ssize_t i, done = 0
        cdef int err
        cdef bint bad = False
        if n < 0:
            n = sizes.shape[0]
        if n > sizes.shape[0] or n > out_locs.shape[0]:
            raise ValueError(f"n={n} exceeds sizes ({sizes.shape[0]}) or out_locs ({out_locs.shape[0]})")
        if self.track_owners:
            if owners is None:
                raise ValueError("this allocator tracks owners: pass owners (the page keys)")
            if n > owners.shape[0]:
                raise ValueError(f"n={n} exceeds owners ({owners.shape[0]})")
        with nogil:
            for i in range(n):
                if sizes[i] == 0 or sizes[i] > MAX_STORED_SIZE:
                    bad = True
                    break
        if bad:
            raise ValueError(f"sizes[{i}] = {sizes[i]} is outside 1..{MAX_STORED_SIZE}")
        self._enter()
        try:
            with nogil:
                err = self._alloc_batch(sizes, out_locs, owners, self.track_owners, n, &done)
        finally:
            self.busy = False
        if err == E_NOMEM:  # give back what this batch got, so the caller sees all or nothing
            self.free(out_locs, done)
            raise MemoryError("no memory for the slot table of a new block")
        return done

    def free(self, const uint64_t[:] locs, Py_ssize_t n=-1) -> None:
        """Free the slots of locs[:n]; absent and zero-page locations are skipped.

        All or nothing: if any location is not an allocated slot (double free, unknown slab,
        wrong size or offset), RramError names its index and nothing of the batch is freed.
        """
        cdef Py_ssize_t bad = 0
        cdef int err
        if n < 0:
            n = locs.shape[0]
        if n > locs.shape[0]:
            raise ValueError(f"n={n} exceeds locs ({locs.shape[0]})")
        self._enter()
        try:
            with nogil:
                err = self._free_batch(locs, n, &bad)
        finally:
            self.busy = False
        if err != E_OK:
            raise RramError(f"cannot free locs[{bad}] = {locs[bad]:#x}: it {_REASONS[err]}; nothing was freed")

    def owners(self, const uint64_t[:] locs, uint64_t[:] out) -> None:
        """out[i] = owner key of the allocated slot locs[i] (0 for absent and zero pages)."""
        cdef Py_ssize_t i, n = locs.shape[0]
        cdef int32_t gid
        cdef int slot, err = E_OK
        cdef block_t *b
        if not self.track_owners:
            raise RramError("this allocator does not track owners")
        if out.shape[0] < n:
            raise ValueError(f"out ({out.shape[0]}) is shorter than locs ({n})")
        with nogil:
            for i in range(n):
                if (locs[i] & KIND_MASK) < KIND_STORED:
                    out[i] = 0
                    continue
                err = self._decode(locs[i], &gid, &slot)
                if err == E_OK:
                    b = self._blk(gid)
                    if (b.freebits[slot >> 6] >> (slot & 63)) & 1:
                        err = E_DOUBLE
                if err != E_OK:
                    break
                out[i] = b.owners[slot]
        if err != E_OK:
            raise RramError(f"locs[{i}] = {locs[i]:#x} {_REASONS[err]}")

    cdef int _owner(self, uint64_t loc, uint64_t *out) noexcept nogil:
        """*out = the owner word of allocated slot ``loc`` (a sealed remote page's version): E_OK
        or the reason it is not an allocated slot.  The allocator must track owners."""
        cdef int32_t gid
        cdef int slot
        cdef int err = self._decode(loc, &gid, &slot)
        if err == E_OK and (self._blk(gid).freebits[slot >> 6] >> (slot & 63)) & 1:
            err = E_DOUBLE
        if err == E_OK:
            out[0] = self._blk(gid).owners[slot]
        return err

    def owner_of(self, uint64_t loc) -> int:
        """The owner of one allocated slot (the scalar ``owners``, for one-page paths)."""
        cdef uint64_t owner = 0
        cdef int err
        if not self.track_owners:
            raise RramError("this allocator does not track owners")
        err = self._owner(loc, &owner)
        if err != E_OK:
            raise RramError(f"location {loc:#x} {_REASONS[err]}")
        return owner

    def pick_victims(self, Py_ssize_t max_n, uint64_t[:] out_locs, uint64_t[:] out_owners=None) -> int:
        """Up to max_n allocated slots to evict, in clock order over blocks (the hand advances,
        so successive calls walk the whole pool).  The locations are exactly those alloc
        returned (stored size included); the caller frees the ones it moves."""
        cdef Py_ssize_t got
        if max_n < 0 or max_n > out_locs.shape[0]:
            raise ValueError(f"max_n={max_n} must be within 0..len(out_locs) ({out_locs.shape[0]})")
        if out_owners is not None and out_owners.shape[0] < max_n:
            raise ValueError(f"out_owners ({out_owners.shape[0]}) is shorter than max_n ({max_n})")
        self._enter()
        with nogil:
            got = self._pick(max_n, out_locs, out_owners, out_owners is not None)
        self.busy = False
        return got

    # -- accounting -------------------------------------------------------------------------

    def slab_used_bytes(self, slab_id: int) -> int:
        """Bytes of the allocated slots of one slab (rounded up to their size classes)."""
        return self.slabs[self._require(slab_id)].slot_bytes

    def slab_ids(self) -> list:
        """Slab ids in the order they were added."""
        return [self.slabs[s].id for s in self._by_seq()]

    def empty_slabs(self) -> list:
        """Ids of the slabs (retired or not) with no allocated slot, in add order."""
        return [self.slabs[s].id for s in self._by_seq() if self.slabs[s].slots_used == 0]

    def retired_slabs(self) -> list:
        return [self.slabs[s].id for s in self._by_seq() if self.slabs[s].retired]

    cdef list _by_seq(self):
        live = [s for s in range(self.nslabs) if self.slabs[s].id != 0]
        live.sort(key=lambda s: self.slabs[s].seq)
        return live

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the slabs that take new slots (not retired)."""
        cdef uint64_t total = 0
        cdef int32_t s
        for s in range(self.nslabs):
            if self.slabs[s].id != 0 and not self.slabs[s].retired:
                total += self.slabs[s].size
        return total

    @property
    def free_bytes(self) -> int:
        """Capacity minus allocated slot bytes of the slabs that take new slots (an upper bound:
        free slots of a partly used block only serve its class)."""
        cdef uint64_t total = 0
        cdef int32_t s
        for s in range(self.nslabs):
            if self.slabs[s].id != 0 and not self.slabs[s].retired:
                total += self.slabs[s].size - self.slabs[s].slot_bytes
        return total

    def can_fit(self, size: int) -> bool:
        """True when one slot of ``size`` bytes can be allocated right now."""
        if not 1 <= size <= MAX_STORED_SIZE:
            raise ValueError(f"size {size} is outside 1..{MAX_STORED_SIZE}")
        return self.partial_head[(size + GRANULE - 1) // GRANULE] != NIL or self.avail_head != NIL

    def stats(self) -> dict:
        cdef int32_t s
        cdef int c
        slots = stored = slot_bytes = blocks = retired = 0
        for s in range(self.nslabs):
            if self.slabs[s].id == 0:
                continue
            slots += self.slabs[s].slots_used
            stored += self.slabs[s].stored_bytes
            slot_bytes += self.slabs[s].slot_bytes
            blocks += self.slabs[s].used_blocks
            if self.slabs[s].retired:
                retired += self.slabs[s].size
        return {
            "slabs": len(self._by_seq()),
            "slots_used": slots,
            "bytes_stored": stored,
            "slot_bytes": slot_bytes,
            "bytes_in_blocks": blocks * BLOCK_SIZE,
            "blocks_used": blocks,
            "capacity_bytes": self.capacity_bytes,
            "free_bytes": self.free_bytes,
            "retired_bytes": retired,
            # the owner words of every slot of every block in use (track_owners only)
            "owner_bytes": sum(self.class_blocks[c] * (BLOCK_GRANULES // c) for c in range(1, NCLASSES + 1))
            * 8 * self.track_owners,
            "class_blocks": {c: self.class_blocks[c] for c in range(1, NCLASSES + 1) if self.class_blocks[c]},
        }
