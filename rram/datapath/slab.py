"""Page locations (the single source of truth) and the size-class slot allocator.

A location is one uint64 (0 = absent)::

    bits  0..1   kind    0 absent, 1 zero page (no storage), 2 stored
    bits  2..14  size    stored length 1..4096 (4096 == stored raw, uncompressed)
    bits 15..36  offset  byte offset in the slab / 64 (slabs up to 256 MiB)
    bits 37..60  slab    slab id (1..2**24-1)

The ``loc_*`` accessors take a Python int (returning an int) or a numpy array (returning a
uint64 array, vectorised), so batches never loop in Python.
"""
from __future__ import annotations

import numpy as np

from .._ext._slab import SlotAllocator  # noqa: F401  (re-exported)

KIND_ABSENT = 0
KIND_ZERO = 1
KIND_STORED = 2

KIND_MASK = 0x3
SIZE_SHIFT = 2
SIZE_FIELD = (1 << 13) - 1
OFFSET_SHIFT = 15
OFFSET_FIELD = (1 << 22) - 1
SLAB_SHIFT = 37
SLAB_FIELD = (1 << 24) - 1
SIZE_MASK = SIZE_FIELD << SIZE_SHIFT
OFFSET_MASK = OFFSET_FIELD << OFFSET_SHIFT
SLAB_MASK = SLAB_FIELD << SLAB_SHIFT

ABSENT = 0
ZERO_LOCATION = KIND_ZERO
GRANULE = 64
BLOCK_SIZE = 65536
MAX_SLAB_SIZE = 256 << 20
MAX_SLAB_ID = SLAB_FIELD
MAX_STORED_SIZE = 4096
SIZE_CLASSES = BLOCK_SIZE // 1024  # 64 classes of c*64 bytes

_U = np.uint64


def _check_layout() -> None:
    """The C batch planner decodes locations itself: refuse one built for another layout."""
    from .._ext import _storepath

    if _storepath.LAYOUT != (SIZE_SHIFT, OFFSET_SHIFT, SLAB_SHIFT, GRANULE):
        raise ImportError("rram._ext._storepath was built for another location layout; rebuild it")


_check_layout()


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


def size_class(size: int) -> int:
    """Slot size class (1..64) of a stored length: slots hold class*64 bytes."""
    if not 1 <= size <= MAX_STORED_SIZE:
        raise ValueError(f"size {size} out of range 1..{MAX_STORED_SIZE}")
    return (size + GRANULE - 1) // GRANULE
