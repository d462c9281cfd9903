"""Page keys: (pool, obj, index) packed into one uint64, so batches of keys are numpy arrays."""
from __future__ import annotations

import numpy as np

from .. import errors

MAX_POOLS = 1 << 8
MAX_OBJECTS = 1 << 24
MAX_INDEX = 1 << 32


def check(pool: int, obj: int) -> None:
    if not 0 <= pool < MAX_POOLS:
        raise errors.RramError(f"pool id {pool} out of range 0..{MAX_POOLS - 1}")
    if not 0 <= obj < MAX_OBJECTS:
        raise errors.RramError(f"object id {obj} out of range 0..{MAX_OBJECTS - 1}")


def pack(pool: int, obj: int, index: int) -> int:
    check(pool, obj)
    if not 0 <= index < MAX_INDEX:
        raise errors.RramError(f"page index {index} out of range 0..{MAX_INDEX - 1}")
    return (pool << 56) | (obj << 32) | index


def pack_many(pool: int, obj: int, indexes) -> np.ndarray:
    """uint64 keys for ``indexes`` (any integer array-like) of one object."""
    check(pool, obj)
    idx = np.asarray(indexes)
    if idx.size and (idx.min() < 0 or idx.max() >= MAX_INDEX):
        raise errors.RramError(f"page index out of range 0..{MAX_INDEX - 1}")
    return idx.astype(np.uint64) | np.uint64((pool << 56) | (obj << 32))


def unpack(key: int) -> tuple[int, int, int]:
    return key >> 56, (key >> 32) & (MAX_OBJECTS - 1), key & (MAX_INDEX - 1)
