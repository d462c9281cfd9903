"""Page locations and the size-class slot allocator.

A location is one uint64 (0 = absent); the layout is declared once, in ext/location.pxd::

    bits  0..1   kind    0 absent, 1 zero page (no storage), 2 stored
    bits  2..14  size    stored length 1..4112 (an image of 1..4096 bytes, 4096 == stored raw;
                         a sealed remote page adds its 16-byte tag)
    bits 15..36  offset  byte offset in the slab / 64 (slabs up to 256 MiB)
    bits 37..60  slab    slab id (1..2**24-1): below FIRST_REMOTE_SLAB local, from it on remote

The constants below come from the compiled modules (every one built from that file must
agree).  The ``loc_*`` accessors and ``is_remote`` take a Python int (returning an int or
bool) or a numpy array (returning an array, vectorised), so batches never loop in Python.
"""
from __future__ import annotations

import numpy as np

from .._ext import _storepath
from .._ext._slab import LAYOUT, SlotAllocator  # noqa: F401  (re-exported)

if _storepath.LAYOUT != LAYOUT:
    raise ImportError("rram._ext._slab and _storepath were built from different ext/location.pxd; rebuild them")

KIND_ABSENT = LAYOUT["KIND_ABSENT"]
KIND_ZERO = LAYOUT["KIND_ZERO"]
KIND_STORED = LAYOUT["KIND_STORED"]
KIND_MASK = LAYOUT["KIND_MASK"]
SIZE_SHIFT = LAYOUT["SIZE_SHIFT"]
SIZE_FIELD = LAYOUT["SIZE_FIELD"]
OFFSET_SHIFT = LAYOUT["OFFSET_SHIFT"]
OFFSET_FIELD = LAYOUT["OFFSET_FIELD"]
SLAB_SHIFT = LAYOUT["SLAB_SHIFT"]
SLAB_FIELD = LAYOUT["SLAB_FIELD"]
LOC_BITS = LAYOUT["LOC_BITS"]  # a location never has a bit set at or above this one
GRANULE = LAYOUT["GRANULE"]
MAX_STORED_SIZE = LAYOUT["MAX_STORED_SIZE"]
#: slab ids 1..FIRST_REMOTE_SLAB-1 are slabs of the local pool, the rest remote virtual slabs
FIRST_REMOTE_SLAB = LAYOUT["FIRST_REMOTE_SLAB"]
SIZE_MASK = SIZE_FIELD << SIZE_SHIFT
OFFSET_MASK = OFFSET_FIELD << OFFSET_SHIFT
SLAB_MASK = SLAB_FIELD << SLAB_SHIFT
MAX_SLAB_ID = SLAB_FIELD

ABSENT = 0
ZERO_LOCATION = KIND_ZERO
BLOCK_SIZE = 65536
MAX_SLAB_SIZE = (OFFSET_FIELD + 1) * GRANULE
SIZE_CLASSES = -(-MAX_STORED_SIZE // GRANULE)  # 65 classes of c*64 bytes (65: a sealed raw page)

_U = np.uint64


def make_location(slab: int, offset: int, size: int) -> int:
    """The stored location of ``size`` bytes at byte ``offset`` of ``slab``."""
    if not 1 <= slab <= MAX_SLAB_ID:
        raise ValueError(f"slab id {slab} out of range 1..{MAX_SLAB_ID}")
    if offset < 0 or offset % GRANULE or offset >= MAX_SLAB_SIZE:
        raise ValueError(f"offset {offset} must be a multiple of {GRANULE} below {MAX_SLAB_SIZE}")
    if not 1 <= size <= MAX_STORED_SIZE:
        raise ValueError(f"size {size} out of range 1..{MAX_STORED_SIZE}")
    return (slab << SLAB_SHIFT) | ((offset // GRANULE) << OFFSET_SHIFT) | (size << SIZE_SHIFT) | KIND_STORED


def _field(loc, shift: int, field: int):
    if isinstance(loc, np.ndarray):
        return (loc.astype(_U, copy=False) >> _U(shift)) & _U(field)
    if isinstance(loc, np.integer):
        return _U((int(loc) >> shift) & field)
    return (loc >> shift) & field


def loc_kind(loc):
    """KIND_ABSENT, KIND_ZERO or KIND_STORED."""
    return _field(loc, 0, KIND_MASK)


def loc_size(loc):
    """Stored length in bytes (0 for absent and zero pages)."""
    return _field(loc, SIZE_SHIFT, SIZE_FIELD)


def loc_offset(loc):
    """Byte offset in the slab."""
    if isinstance(loc, np.ndarray):
        return _field(loc, OFFSET_SHIFT, OFFSET_FIELD) * _U(GRANULE)
    return _field(loc, OFFSET_SHIFT, OFFSET_FIELD) * GRANULE


def loc_slab(loc):
    """Slab id (0 for absent and zero pages)."""
    return _field(loc, SLAB_SHIFT, SLAB_FIELD)


def is_remote(loc):
    """True where ``loc`` is a page stored in a remote virtual slab (not local, zero or absent)."""
    return (loc_kind(loc) == KIND_STORED) & (loc_slab(loc) >= FIRST_REMOTE_SLAB)


def is_local(loc):
    """True where ``loc`` is a page stored in the local pool (not remote, zero or absent)."""
    return (loc_kind(loc) == KIND_STORED) & (loc_slab(loc) < FIRST_REMOTE_SLAB)


def size_class(size: int) -> int:
    """Slot size class (1..64) of a stored length: slots hold class*64 bytes."""
    if not 1 <= size <= MAX_STORED_SIZE:
        raise ValueError(f"size {size} out of range 1..{MAX_STORED_SIZE}")
    return (size + GRANULE - 1) // GRANULE
