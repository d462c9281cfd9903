# cython: language_level=3
"""Compact page map: uint64 key -> uint64 location (0 = absent), about 8 bytes a page.

Keys are ``pool << 56 | obj << 32 | index`` (rram/datapath/keys.py).  Locations live in dense
chunks of 512 slots, one per ``key >> 9``, malloc'ed and found through an open-addressing hash
table (linear probing, Fibonacci hashing, backward-shift deletion: no tombstones).  Each chunk
is also linked into its object's list, and each object into its pool's list, so removing a key
range (an object, a pool) visits only the chunks involved.  A chunk is freed with its last entry.

Not thread-safe: the page store holds a lock around every call.  The GIL is released inside
batch calls, so overlapping calls from two threads raise RramError instead of corrupting memory.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free, qsort
from libc.string cimport memset

import numpy as np

from rram.errors import RramError

cdef extern from *:
    """
    #define RRAM_PM_EMPTY (~0ULL)
    """
    uint64_t EMPTY "RRAM_PM_EMPTY"

cdef enum:
    OBJ_SHIFT = 32 - CHUNK_BITS        # chunk number -> object number (key >> 32)
    POOL_SHIFT = 56
    MIN_TABLE_BITS = 4
    PROBE_OBJECTS_MAX = 64             # ranges over fewer objects probe the object table


cdef int table_init(table_t *t, int bits) noexcept nogil:
    cdef uint64_t cap = (<uint64_t>1) << bits
    t.keys = <uint64_t *>malloc(cap * sizeof(uint64_t))
    t.vals = <void **>malloc(cap * sizeof(void *))
    if t.keys == NULL or t.vals == NULL:
        free(t.keys)
        free(t.vals)
        t.keys = NULL
        t.vals = NULL
        return -1
    memset(t.keys, 0xFF, cap * sizeof(uint64_t))
    t.mask = cap - 1
    t.count = 0
    t.shift = 64 - bits
    return 0


cdef void table_free(table_t *t) noexcept nogil:
    free(t.keys)
    free(t.vals)
    t.keys = NULL
    t.vals = NULL


cdef inline uint64_t table_home(table_t *t, uint64_t k) noexcept nogil:
    return (k * 0x9E3779B97F4A7C15ULL) >> t.shift


cdef inline void *table_find(table_t *t, uint64_t k) noexcept nogil:
    cdef uint64_t i = table_home(t, k)
    while True:
        if t.keys[i] == k:
            return t.vals[i]
        if t.keys[i] == EMPTY:
            return NULL
        i = (i + 1) & t.mask


cdef void table_place(table_t *t, uint64_t k, void *v) noexcept nogil:
    cdef uint64_t i = table_home(t, k)
    while t.keys[i] != EMPTY:
        i = (i + 1) & t.mask
    t.keys[i] = k
    t.vals[i] = v
    t.count += 1


cdef int table_insert(table_t *t, uint64_t k, void *v) noexcept nogil:
    """Insert a key known to be absent; grows at 70% load. -1 when out of memory."""
    cdef table_t bigger
    cdef uint64_t i
    if (t.count + 1) * 10 > (t.mask + 1) * 7:
        if table_init(&bigger, 64 - t.shift + 1) < 0:
            return -1
        for i in range(t.mask + 1):
            if t.keys[i] != EMPTY:
                table_place(&bigger, t.keys[i], t.vals[i])
        table_free(t)
        t[0] = bigger
    table_place(t, k, v)
    return 0


cdef void table_remove(table_t *t, uint64_t k) noexcept nogil:
    """Backward-shift deletion keeps every probe chain unbroken without tombstones."""
    cdef uint64_t i = table_home(t, k)
    cdef uint64_t j, home
    while t.keys[i] != k:
        if t.keys[i] == EMPTY:
            return
        i = (i + 1) & t.mask
    j = i
    while True:
        j = (j + 1) & t.mask
        if t.keys[j] == EMPTY:
            break
        home = table_home(t, t.keys[j])
        # move j back into the hole at i unless its home lies cyclically in (i, j]
        if ((j - home) & t.mask) >= ((j - i) & t.mask):
            t.keys[i] = t.keys[j]
            t.vals[i] = t.vals[j]
            i = j
    t.keys[i] = EMPTY
    t.count -= 1


cdef inline uint64_t table_capacity(table_t *t) noexcept nogil:
    return t.mask + 1


cdef int cmp_chunks(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<chunk_t **>a)[0].no
    cdef uint64_t y = (<chunk_t **>b)[0].no
    return (x > y) - (x < y)


cdef class PageMap:
    """uint64 page key -> uint64 location; batch calls over numpy arrays. Not thread-safe."""


    def __cinit__(self):
        memset(self.pools, 0, sizeof(self.pools))
        self.last = NULL
        self.entries = 0
        self.nobjects = 0
        self.busy = False
        if table_init(&self.chunks, MIN_TABLE_BITS) < 0 or table_init(&self.objects, MIN_TABLE_BITS) < 0:
            raise MemoryError()

    def __dealloc__(self):
        cdef uint64_t i
        if self.chunks.keys != NULL:
            for i in range(self.chunks.mask + 1):
                if self.chunks.keys[i] != EMPTY:
                    free(self.chunks.vals[i])
        if self.objects.keys != NULL:
            for i in range(self.objects.mask + 1):
                if self.objects.keys[i] != EMPTY:
                    free(self.objects.vals[i])
        table_free(&self.chunks)
        table_free(&self.objects)

    # -- chunks ---------------------------------------------------------------------------

    cdef chunk_t *_find(self, uint64_t cno) noexcept nogil:
        if self.last != NULL and self.last.no == cno:
            return self.last
        cdef chunk_t *ch = <chunk_t *>table_find(&self.chunks, cno)
        if ch != NULL:
            self.last = ch
        return ch

    cdef chunk_t *_make(self, uint64_t cno) noexcept nogil:
        """The chunk for ``cno``, created (with its object) when missing; NULL when out of memory."""
        cdef chunk_t *ch = self._find(cno)
        cdef obj_t *ob
        cdef uint64_t ono = cno >> OBJ_SHIFT
        if ch != NULL:
            return ch
        ob = <obj_t *>table_find(&self.objects, ono)
        if ob == NULL:
            ob = <obj_t *>calloc(1, sizeof(obj_t))
            if ob == NULL:
                return NULL
            if table_insert(&self.objects, ono, ob) < 0:
                free(ob)
                return NULL
            ob.no = ono
            ob.next = self.pools[ono >> (POOL_SHIFT - 32)]
            if ob.next != NULL:
                ob.next.prev = ob
            self.pools[ono >> (POOL_SHIFT - 32)] = ob
            self.nobjects += 1
        ch = <chunk_t *>calloc(1, sizeof(chunk_t))
        if ch == NULL:
            self._drop_object_if_empty(ob)
            return NULL
        if table_insert(&self.chunks, cno, ch) < 0:
            free(ch)
            self._drop_object_if_empty(ob)
            return NULL
        ch.no = cno
        ch.obj = ob
        ch.next = ob.chunks
        if ch.next != NULL:
            ch.next.prev = ch
        ob.chunks = ch
        ob.nchunks += 1
        self.last = ch
        return ch

    cdef void _drop_object_if_empty(self, obj_t *ob) noexcept nogil:
        if ob.nchunks:
            return
        if ob.prev != NULL:
            ob.prev.next = ob.next
        else:
            self.pools[ob.no >> (POOL_SHIFT - 32)] = ob.next
        if ob.next != NULL:
            ob.next.prev = ob.prev
        table_remove(&self.objects, ob.no)
        self.nobjects -= 1
        free(ob)

    cdef void _drop(self, chunk_t *ch) noexcept nogil:
        """Free an empty chunk (and its object when that was its last chunk)."""
        cdef obj_t *ob = ch.obj
        if ch.prev != NULL:
            ch.prev.next = ch.next
        else:
            ob.chunks = ch.next
        if ch.next != NULL:
            ch.next.prev = ch.prev
        ob.nchunks -= 1
        table_remove(&self.chunks, ch.no)
        if self.last == ch:
            self.last = NULL
        free(ch)
        self._drop_object_if_empty(ob)

    cdef uint64_t _get(self, uint64_t key) noexcept nogil:
        cdef chunk_t *ch = self._find(key >> CHUNK_BITS)
        return ch.vals[key & (CHUNK_SLOTS - 1)] if ch != NULL else 0

    cdef uint64_t _set(self, uint64_t key, uint64_t loc, bint *nomem) noexcept nogil:
        """Store loc (0 removes); returns the previous value."""
        cdef chunk_t *ch
        cdef uint64_t old
        cdef uint32_t i = key & (CHUNK_SLOTS - 1)
        if loc == 0:
            ch = self._find(key >> CHUNK_BITS)
            if ch == NULL:
                return 0
            old = ch.vals[i]
            if old != 0:
                ch.vals[i] = 0
                ch.count -= 1
                self.entries -= 1
                if ch.count == 0:
                    self._drop(ch)
            return old
        ch = self._make(key >> CHUNK_BITS)
        if ch == NULL:
            nomem[0] = True
            return 0
        old = ch.vals[i]
        ch.vals[i] = loc
        if old == 0:
            ch.count += 1
            self.entries += 1
        return old

    # -- guards ---------------------------------------------------------------------------

    cdef _enter(self):
        if self.busy:
            raise RramError("PageMap used from two threads at once (it is not thread-safe)")
        self.busy = True

    @staticmethod
    cdef _check_len(str what, Py_ssize_t have, Py_ssize_t n):
        if have < n:
            raise ValueError(f"{what} has {have} elements, fewer than the {n} keys")

    # -- batch API ------------------------------------------------------------------------

    def lookup(self, const uint64_t[:] keys, uint64_t[:] out) -> int:
        """out[i] = location of keys[i] (0 when absent); returns how many were found."""
        cdef Py_ssize_t i, n = keys.shape[0], found = 0
        PageMap._check_len("out", out.shape[0], n)
        self._enter()
        with nogil:
            for i in range(n):
                out[i] = self._get(keys[i])
                found += out[i] != 0
        self.busy = False
        return found

    def store(self, const uint64_t[:] keys, const uint64_t[:] locs, uint64_t[:] old_out) -> None:
        """Set keys[i] -> locs[i] in order (0 removes); old_out[i] gets the previous value or 0."""
        cdef Py_ssize_t i = 0, n = keys.shape[0]
        cdef bint nomem = False
        PageMap._check_len("locs", locs.shape[0], n)
        PageMap._check_len("old_out", old_out.shape[0], n)
        self._enter()
        with nogil:
            for i in range(n):
                old_out[i] = self._set(keys[i], locs[i], &nomem)
                if nomem:
                    break
        self.busy = False
        if nomem:
            raise MemoryError(f"page map: out of memory at keys[{i}] (earlier keys were stored)")

    def remove(self, const uint64_t[:] keys, uint64_t[:] old_out) -> int:
        """Remove keys; old_out[i] gets the removed location or 0. Returns how many were present."""
        cdef Py_ssize_t i, n = keys.shape[0], removed = 0
        cdef bint nomem = False
        PageMap._check_len("old_out", old_out.shape[0], n)
        self._enter()
        with nogil:
            for i in range(n):
                old_out[i] = self._set(keys[i], 0, &nomem)
                removed += old_out[i] != 0
        self.busy = False
        return removed

    def cas(self, const uint64_t[:] keys, const uint64_t[:] expected, const uint64_t[:] new,
            uint8_t[:] ok_out) -> int:
        """Where the current location of keys[i] equals expected[i], set it to new[i] (0 removes);
        ok_out[i] = 1 there, else 0.  Returns the number of successes."""
        cdef Py_ssize_t i = 0, n = keys.shape[0], done = 0
        cdef bint nomem = False
        PageMap._check_len("expected", expected.shape[0], n)
        PageMap._check_len("new", new.shape[0], n)
        PageMap._check_len("ok_out", ok_out.shape[0], n)
        self._enter()
        with nogil:
            for i in range(n):
                if self._get(keys[i]) == expected[i]:
                    self._set(keys[i], new[i], &nomem)
                    if nomem:
                        ok_out[i] = 0
                        break
                    ok_out[i] = 1
                    done += 1
                else:
                    ok_out[i] = 0
        self.busy = False
        if nomem:
            raise MemoryError(f"page map: out of memory at keys[{i}] (earlier keys were set)")
        return done

    # -- scalar fast paths ----------------------------------------------------------------

    def get(self, uint64_t key) -> int:
        """Location of one key (0 when absent)."""
        if self.busy:
            raise RramError("PageMap used from two threads at once (it is not thread-safe)")
        return self._get(key)

    def set(self, uint64_t key, uint64_t loc) -> int:
        """Set one key (0 removes); returns the previous location or 0."""
        cdef bint nomem = False
        self._enter()
        old = self._set(key, loc, &nomem)
        self.busy = False
        if nomem:
            raise MemoryError("page map: out of memory")
        return old

    # -- ranges and scans -----------------------------------------------------------------

    cdef Py_ssize_t _chunks_in_range(self, uint64_t lo, uint64_t last, chunk_t **out) noexcept nogil:
        """Chunks that may hold keys in [lo, last], into out (room for every chunk)."""
        cdef uint64_t olo = lo >> 32, ohi = last >> 32, o, clo = lo >> CHUNK_BITS, chi = last >> CHUNK_BITS
        cdef uint64_t p
        cdef Py_ssize_t n = 0
        cdef obj_t *ob
        cdef chunk_t *ch
        if ohi - olo < PROBE_OBJECTS_MAX:
            o = olo
            while True:
                ob = <obj_t *>table_find(&self.objects, o)
                if ob != NULL:
                    n = self._collect(ob, clo, chi, out, n)
                if o == ohi:
                    break
                o += 1
            return n
        for p in range(olo >> (POOL_SHIFT - 32), (ohi >> (POOL_SHIFT - 32)) + 1):
            ob = self.pools[p]
            while ob != NULL:
                if olo <= ob.no <= ohi:
                    n = self._collect(ob, clo, chi, out, n)
                ob = ob.next
        return n

    cdef Py_ssize_t _collect(self, obj_t *ob, uint64_t clo, uint64_t chi, chunk_t **out,
                             Py_ssize_t n) noexcept nogil:
        cdef chunk_t *ch = ob.chunks
        while ch != NULL:
            if clo <= ch.no <= chi:
                out[n] = ch
                n += 1
            ch = ch.next
        return n

    def remove_range(self, lo_key, hi_key):
        """Remove every entry with lo_key <= key < hi_key; returns (keys, locs) in key order.

        ``hi_key`` may be 2**64 (the end of the key space).  Visits only the objects and
        chunks in the range (not the whole map)."""
        cdef chunk_t **found
        cdef chunk_t *ch
        cdef Py_ssize_t nch, c, total = 0, k = 0
        cdef uint64_t base, key, lo, last
        cdef int i
        cdef uint64_t[:] kv
        cdef uint64_t[:] lv
        if not 0 <= lo_key < 1 << 64 or not 0 <= hi_key <= 1 << 64:
            raise ValueError(f"key range [{lo_key}, {hi_key}) is outside 0..2**64")
        if hi_key <= lo_key:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        lo = lo_key
        last = hi_key - 1
        self._enter()
        try:
            found = <chunk_t **>malloc((table_capacity(&self.chunks)) * sizeof(chunk_t *))
            if found == NULL:
                raise MemoryError()
            with nogil:
                nch = self._chunks_in_range(lo, last, found)
                qsort(found, nch, sizeof(chunk_t *), cmp_chunks)
                for c in range(nch):
                    ch = found[c]
                    base = ch.no << CHUNK_BITS
                    for i in range(CHUNK_SLOTS):
                        key = base + i
                        if ch.vals[i] != 0 and lo <= key <= last:
                            total += 1
            keys = np.empty(total, np.uint64)
            locs = np.empty(total, np.uint64)
            kv = keys
            lv = locs
            with nogil:
                for c in range(nch):
                    ch = found[c]
                    base = ch.no << CHUNK_BITS
                    for i in range(CHUNK_SLOTS):
                        key = base + i
                        if ch.vals[i] != 0 and lo <= key <= last:
                            kv[k] = key
                            lv[k] = ch.vals[i]
                            k += 1
                            ch.vals[i] = 0
                            ch.count -= 1
                    if ch.count == 0:
                        self._drop(ch)
                self.entries -= total
            free(found)
        finally:
            self.busy = False
        return keys, locs

    def select(self, uint64_t mask, uint64_t value, Py_ssize_t limit=0, uint64_t start_key=0):
        """Entries with (loc & mask) == value and key >= start_key, in key order, at most
        ``limit`` of them (0: all); returns (keys, locs).  Scans the whole map (in C)."""
        cdef chunk_t **found
        cdef chunk_t *ch
        cdef Py_ssize_t nch = 0, c, total = 0, k = 0
        cdef uint64_t i, base, loc, start_chunk = start_key >> CHUNK_BITS
        cdef int j
        cdef uint64_t[:] kv
        cdef uint64_t[:] lv
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._enter()
        try:
            found = <chunk_t **>malloc((table_capacity(&self.chunks)) * sizeof(chunk_t *))
            if found == NULL:
                raise MemoryError()
            with nogil:
                for i in range(self.chunks.mask + 1):
                    if self.chunks.keys[i] != EMPTY and self.chunks.keys[i] >= start_chunk:
                        found[nch] = <chunk_t *>self.chunks.vals[i]
                        nch += 1
                qsort(found, nch, sizeof(chunk_t *), cmp_chunks)
                for c in range(nch):
                    ch = found[c]
                    base = ch.no << CHUNK_BITS
                    for j in range(CHUNK_SLOTS):
                        loc = ch.vals[j]
                        if loc != 0 and (loc & mask) == value and base + j >= start_key:
                            total += 1
                    if limit and total >= limit:
                        total = limit
                        break
            keys = np.empty(total, np.uint64)
            locs = np.empty(total, np.uint64)
            kv = keys
            lv = locs
            with nogil:
                for c in range(nch):
                    if k >= total:
                        break
                    ch = found[c]
                    base = ch.no << CHUNK_BITS
                    for j in range(CHUNK_SLOTS):
                        loc = ch.vals[j]
                        if loc != 0 and (loc & mask) == value and base + j >= start_key:
                            kv[k] = base + j
                            lv[k] = loc
                            k += 1
                            if k >= total:
                                break
            free(found)
        finally:
            self.busy = False
        return keys, locs

    # -- size -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.entries

    @property
    def chunk_count(self) -> int:
        return self.chunks.count

    @property
    def object_count(self) -> int:
        return self.nobjects

    def metadata_bytes(self) -> int:
        """Bytes this map holds in C: chunks, object records and both hash tables
        (malloc's own headers not included; the benchmark measures those too)."""
        return (self.chunks.count * sizeof(chunk_t) + self.nobjects * sizeof(obj_t)
                + (self.chunks.mask + 1 + self.objects.mask + 1) * (sizeof(uint64_t) + sizeof(void *))
                + sizeof(self.pools))

