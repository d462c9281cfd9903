"""The page codec: n pages in, n compressed images at a 4096-byte stride plus a size each.

Sizes: 0 = all-zero page (nothing stored), 4096 = incompressible (stored raw), anything else
is the length of an LZ4 block without a size header (at most ``MAX_COMPRESSED``).

Two implementations with one API: the native ``rram._ext._codec`` (liblz4, GIL released,
one C call a batch) and a pure-Python one on python-lz4, used when the extension is not
built or when ``RRAM_PUREPYTHON=1``.  ``implementations()`` hands out both so that tests and
benchmarks can run them side by side; their images are interchangeable (byte-identical
when both run the same liblz4 version: both compress each page as a fresh LZ4 stream).
"""
from __future__ import annotations

import ctypes
import logging
import os
from types import SimpleNamespace

import lz4
import lz4.block
import numpy as np

from .. import errors
from ..units import PAGE_SIZE

log = logging.getLogger(__name__)

#: an LZ4 block longer than this saves too little; the page is stored raw instead
MAX_COMPRESSED = 3584


# -- pure-Python implementation -------------------------------------------------------------


def _bytes_of(obj, what: str, writable: bool) -> np.ndarray:
    """A flat uint8 view of a buffer, with the same errors as the native module."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what} must support the buffer protocol, got {type(obj).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{what} must be a contiguous buffer")
    if writable and view.readonly:
        raise ValueError(f"{what} must be a writable contiguous buffer")
    return np.frombuffer(view, dtype=np.uint8)


def _array_of(obj, dtype, what: str, n: int, writable: bool = False) -> np.ndarray:
    arr = np.asarray(obj)
    if arr.ndim != 1 or arr.dtype != dtype:
        raise ValueError(f"{what} must be a 1-d {np.dtype(dtype).name} array, got {arr.dtype} with shape {arr.shape}")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{what} must be writable")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(arr) < n:
        raise ValueError(f"{what} holds {len(arr)} entries, fewer than n={n}")
    return arr


def _check_bytes(buf: np.ndarray, n: int, what: str) -> None:
    if buf.nbytes < n * PAGE_SIZE:
        raise ValueError(f"{what} has {buf.nbytes} bytes, fewer than n*4096 = {n * PAGE_SIZE}")


def _nonzero_pages(pages: np.ndarray) -> np.ndarray:
    """Indexes of the pages (rows of 4096 bytes) that hold a non-zero byte."""
    if pages.ctypes.data % 8 == 0:
        pages = pages.view(np.uint64)  # 8x fewer elements to reduce
    return np.flatnonzero(pages.any(axis=1))


def _py_compress_pages(src, n: int, dst, sizes, acceleration: int = 1) -> int:
    sizes = _array_of(sizes, np.uint32, "sizes", n, writable=True)
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    s = _bytes_of(src, "src", False)
    d = _bytes_of(dst, "dst", True)
    _check_bytes(s, n, "src")
    _check_bytes(d, n, "dst")
    pages = s[: n * PAGE_SIZE].reshape(n, PAGE_SIZE)
    out = d[: n * PAGE_SIZE].reshape(n, PAGE_SIZE)
    sizes[:n] = 0
    for i in _nonzero_pages(pages):
        block = lz4.block.compress(pages[i], mode="fast", acceleration=acceleration, store_size=False)
        if len(block) > MAX_COMPRESSED:
            out[i] = pages[i]
            sizes[i] = PAGE_SIZE
        else:
            out[i, : len(block)] = np.frombuffer(block, dtype=np.uint8)
            sizes[i] = len(block)
    return int(sizes[:n].sum(dtype=np.uint64))


def _expand(image, size: int, index: int) -> bytes:
    try:
        page = lz4.block.decompress(image, uncompressed_size=PAGE_SIZE)
    except lz4.block.LZ4BlockError as exc:
        raise errors.CorruptDataError(
            f"page {index} of the batch: its {size}-byte stored image is corrupt: {exc}"
        ) from exc
    if len(page) != PAGE_SIZE:
        raise errors.CorruptDataError(
            f"page {index} of the batch: its {size}-byte stored image is corrupt: "
            f"decompressed to {len(page)} bytes instead of 4096"
        )
    return page


def _py_decompress_pages(src_addrs, sizes, n: int, dst) -> None:
    addrs = _array_of(src_addrs, np.uint64, "src_addrs", n)[:n]
    sizes = _array_of(sizes, np.uint32, "sizes", n)[:n]
    bad = np.flatnonzero((sizes > PAGE_SIZE) | ((sizes != 0) & (addrs == 0)))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"page {i}: size {sizes[i]} at address {int(addrs[i]):#x} is not a stored page image")
    d = _bytes_of(dst, "dst", True)
    _check_bytes(d, n, "dst")
    out = d[: n * PAGE_SIZE].reshape(n, PAGE_SIZE)
    out[sizes == 0] = 0
    base = out.ctypes.data
    for i in np.flatnonzero(sizes):
        size, addr = int(sizes[i]), int(addrs[i])
        if size == PAGE_SIZE:
            ctypes.memmove(base + int(i) * PAGE_SIZE, addr, PAGE_SIZE)
        else:
            out[i] = np.frombuffer(_expand(ctypes.string_at(addr, size), size, int(i)), dtype=np.uint8)


def _py_decompress_buffer(src, offsets, sizes, n: int, dst) -> None:
    offsets = _array_of(offsets, np.uint64, "offsets", n)[:n]
    sizes = _array_of(sizes, np.uint32, "sizes", n)[:n]
    s = _bytes_of(src, "src", False)
    limit = np.uint64(s.nbytes)
    bad = np.flatnonzero((sizes > PAGE_SIZE) | (offsets > limit) | (sizes > limit - np.minimum(offsets, limit)))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"page {i}: size {sizes[i]} at offset {offsets[i]} does not fit "
                         f"a stored page image inside the {s.nbytes}-byte source buffer")
    d = _bytes_of(dst, "dst", True)
    _check_bytes(d, n, "dst")
    out = d[: n * PAGE_SIZE].reshape(n, PAGE_SIZE)
    out[sizes == 0] = 0
    for i in np.flatnonzero(sizes):
        size, off = int(sizes[i]), int(offsets[i])
        image = s[off : off + size]
        out[i] = image if size == PAGE_SIZE else np.frombuffer(_expand(image, size, int(i)), dtype=np.uint8)


PYTHON = SimpleNamespace(
    name="python",
    compress_pages=_py_compress_pages,
    decompress_pages=_py_decompress_pages,
    decompress_buffer=_py_decompress_buffer,
    lz4_version=lambda: lz4.library_version_string(),
)


# -- choosing one ---------------------------------------------------------------------------


def _load_native():
    """(module-like, None) or (None, why the native codec is not used)."""
    if os.environ.get("RRAM_PUREPYTHON") == "1":
        return None, "RRAM_PUREPYTHON=1 forces the pure-Python codec"
    try:
        from .._ext import _codec
    except ImportError as exc:
        return None, f"rram._ext._codec is not built ({exc}); build it with setup.py build_ext --inplace"
    if _codec.MAX_COMPRESSED != MAX_COMPRESSED or _codec.PAGE_SIZE != PAGE_SIZE:
        return None, "rram._ext._codec was built from an older ext/_codec.pyx; rebuild it"
    native = SimpleNamespace(
        name="native",
        compress_pages=_codec.compress_pages,
        decompress_pages=_codec.decompress_pages,
        decompress_buffer=_codec.decompress_buffer,
        lz4_version=_codec.lz4_version,
    )
    return native, None


_NATIVE, NATIVE_UNAVAILABLE = _load_native()
if NATIVE_UNAVAILABLE:
    log.debug("using the pure-Python codec: %s", NATIVE_UNAVAILABLE)

_CHOSEN = _NATIVE or PYTHON
#: "native" or "python"
IMPLEMENTATION: str = _CHOSEN.name
compress_pages = _CHOSEN.compress_pages
decompress_pages = _CHOSEN.decompress_pages
decompress_buffer = _CHOSEN.decompress_buffer
lz4_version = _CHOSEN.lz4_version


def implementations() -> dict[str, SimpleNamespace]:
    """The usable implementations by name ("native" first when built, then "python").

    ``NATIVE_UNAVAILABLE`` says why "native" is missing.
    """
    found = {"native": _NATIVE} if _NATIVE else {}
    found["python"] = PYTHON
    return found


__all__ = [
    "IMPLEMENTATION",
    "MAX_COMPRESSED",
    "NATIVE_UNAVAILABLE",
    "PAGE_SIZE",
    "compress_pages",
    "decompress_buffer",
    "decompress_pages",
    "implementations",
    "lz4_version",
]
