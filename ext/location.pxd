# The page location layout, declared once.  A location is one uint64 (0 = absent):
#
#   bits  0..1   kind    0 absent, 1 zero page (no storage), 2 stored
#   bits  2..14  size    stored length 1..4112: an image of 1..4096 bytes (4096 == stored raw,
#                        uncompressed), plus the 16-byte tag in a remote slab when pages are
#                        sealed (rram/_ext/_seal.pxd)
#   bits 15..36  offset  byte offset in the slab / 64 (slabs up to 256 MiB)
#   bits 37..60  slab    slab id (1..2**24-1): 1..FIRST_REMOTE_SLAB-1 are slabs of the local
#                        pool, FIRST_REMOTE_SLAB and up are remote virtual slabs
#
# Every compiled user (_slab, _storepath) cimports this file and publishes ``LAYOUT =
# location_layout()``; rram/datapath/slab.py takes its constants from there and refuses a
# set of modules built from different versions of this file.
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    KIND_MASK = 3
    KIND_ABSENT = 0
    KIND_ZERO = 1
    KIND_STORED = 2
    SIZE_SHIFT = 2
    SIZE_FIELD = (1 << 13) - 1
    OFFSET_SHIFT = 15
    OFFSET_FIELD = (1 << 22) - 1
    SLAB_SHIFT = 37
    SLAB_FIELD = (1 << 24) - 1
    LOC_BITS = 61  # the bits above are always 0
    GRANULE = 64
    MAX_STORED_SIZE = 4112  # a raw page and its seal tag
    FIRST_REMOTE_SLAB = 4096


cdef inline uint64_t loc_pack(uint64_t slab, uint64_t granule, uint64_t size) noexcept nogil:
    """The stored location of ``size`` bytes at ``granule`` * GRANULE bytes into ``slab``."""
    return (slab << SLAB_SHIFT) | (granule << OFFSET_SHIFT) | (size << SIZE_SHIFT) | KIND_STORED


cdef inline uint32_t loc_size(uint64_t loc) noexcept nogil:
    return <uint32_t>((loc >> SIZE_SHIFT) & SIZE_FIELD)


cdef inline uint64_t loc_granule(uint64_t loc) noexcept nogil:
    return (loc >> OFFSET_SHIFT) & OFFSET_FIELD


cdef inline uint64_t loc_offset(uint64_t loc) noexcept nogil:
    return loc_granule(loc) * GRANULE


cdef inline uint64_t loc_slab(uint64_t loc) noexcept nogil:
    return (loc >> SLAB_SHIFT) & SLAB_FIELD


cdef inline dict location_layout():
    return {"KIND_MASK": KIND_MASK, "KIND_ABSENT": KIND_ABSENT, "KIND_ZERO": KIND_ZERO,
            "KIND_STORED": KIND_STORED, "SIZE_SHIFT": SIZE_SHIFT, "SIZE_FIELD": SIZE_FIELD,
            "OFFSET_SHIFT": OFFSET_SHIFT, "OFFSET_FIELD": OFFSET_FIELD, "SLAB_SHIFT": SLAB_SHIFT,
            "SLAB_FIELD": SLAB_FIELD, "LOC_BITS": LOC_BITS, "GRANULE": GRANULE, "MAX_STORED_SIZE": MAX_STORED_SIZE,
            "FIRST_REMOTE_SLAB": FIRST_REMOTE_SLAB}
