"""What an NBD export is stored in: the Backend interface, a memory backend, the page store.

Offsets and lengths reaching a backend are already checked against the export (protocol.py).
A backend raises RequestError for an error the client should see with a specific NBD error;
the server maps StoreFullError to ENOSPC and any other failure to EIO.
"""
from __future__ import annotations

import abc
import threading

import numpy as np

from ... import errors
from ...units import PAGE_SIZE

#: pages per store call when zeroing or invalidating large ranges (bounds temporary arrays)
RANGE_CHUNK = 16384
_ZERO_PAGE = bytes(PAGE_SIZE)


class Backend(abc.ABC):
    """A byte range of ``size`` bytes.  Implementations must be safe to call from several threads."""

    size: int = 0

    @abc.abstractmethod
    def read(self, offset: int, length: int, out: memoryview) -> None:
        """Fill ``out`` (exactly ``length`` writable bytes) with the export's bytes at ``offset``."""

    @abc.abstractmethod
    def write(self, offset: int, data, fua: bool = False) -> None:
        """Store ``data`` at ``offset``; with ``fua``, return only once it is durable."""

    @abc.abstractmethod
    def trim(self, offset: int, length: int) -> None:
        """A hint that the range is unused; its contents are undefined afterwards."""

    @abc.abstractmethod
    def zero(self, offset: int, length: int, no_hole: bool = False) -> None:
        """Make the range read as zeros; ``no_hole`` asks for storage to stay allocated."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Return once every completed write is durable."""

    def read_pages(self, pages: np.ndarray, out) -> None:
        """Fill ``out`` (len(pages) * 4096 bytes) with the 4 KiB blocks numbered ``pages``.

        The server's batch path; backends with a batch store call override it.
        """
        view = memoryview(out).cast("B")
        for i, page in enumerate(pages.tolist()):
            self.read(page * PAGE_SIZE, PAGE_SIZE, view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])

    def write_pages(self, pages: np.ndarray, data) -> None:
        """Store ``data`` (len(pages) * 4096 bytes) as the blocks ``pages``.

        The blocks are distinct: the server never puts two writes of one block in a run.
        """
        view = memoryview(data).cast("B")
        for i, page in enumerate(pages.tolist()):
            self.write(page * PAGE_SIZE, view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])

    def request_path(self):
        """(a rram._ext._reqpath.RequestPath, the page key of block 0) when single-block READs and
        WRITEs can be served in C (block i is key | i), else None."""
        return None

    def close(self) -> None:
        pass


class MemoryBackend(Backend):
    """A bytearray: for unit tests and for checking the server against real clients."""

    def __init__(self, size: int):
        if size < 0:
            raise errors.ConfigError(f"export size must be >= 0, got {size}")
        self.size = size
        self.data = bytearray(size)
        self.flushes = 0

    def read(self, offset, length, out):
        out[:length] = memoryview(self.data)[offset:offset + length]

    def write(self, offset, data, fua=False):
        data = memoryview(data).cast("B")
        memoryview(self.data)[offset:offset + len(data)] = data

    def trim(self, offset, length):
        self.zero(offset, length)  # discarding may leave anything; zeros are the simplest anything

    def zero(self, offset, length, no_hole=False):
        memoryview(self.data)[offset:offset + length] = bytes(length)

    def flush(self):
        self.flushes += 1


class PageStoreBackend(Backend):
    """An export kept in a persistent pool of the page store: block i is page (pool, obj, i).

    Whole pages go to the store as they are, in one batch call; a partial page at either end
    of a write is read, patched and written back (under a lock, so that two connections
    patching different bytes of one page cannot lose each other's bytes).  TRIM and
    WRITE_ZEROES invalidate whole pages; a page never written (or invalidated) reads as zeros.
    """

    def __init__(self, store, pool: int, obj: int = 0, size: int = 0):
        if size <= 0 or size % PAGE_SIZE:
            raise errors.ConfigError(f"export size must be a positive multiple of {PAGE_SIZE}, got {size}")
        if size // PAGE_SIZE > 1 << 32:
            raise errors.ConfigError(f"export size {size} needs more than 2**32 pages")
        self.store = store
        self.pool = pool
        self.obj = obj
        self.size = size
        self._rmw = threading.Lock()

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _pages(first: int, n: int) -> np.ndarray:
        return np.arange(first, first + n, dtype=np.uint32)

    def _get(self, first: int, n: int, out) -> None:
        self.store.get_many(self.pool, self.obj, self._pages(first, n), out)

    def _put(self, first: int, n: int, pages) -> None:
        self.store.put_many(self.pool, self.obj, self._pages(first, n), pages)

    @staticmethod
    def _inner(offset: int, length: int) -> tuple[int, int]:
        """The whole pages inside [offset, offset+length): (first page, count)."""
        first = -(-offset // PAGE_SIZE)
        last = (offset + length) // PAGE_SIZE
        return first, max(0, last - first)

    @staticmethod
    def _edges(offset: int, length: int) -> list[int]:
        """Pages only partly covered by [offset, offset+length)."""
        end = offset + length
        edges = []
        if offset % PAGE_SIZE:
            edges.append(offset // PAGE_SIZE)
        if end % PAGE_SIZE and (end - 1) // PAGE_SIZE not in edges:
            edges.append((end - 1) // PAGE_SIZE)
        return edges

    def _patch_edges(self, offset: int, length: int, data) -> None:
        """Read-modify-write the partial pages at the ends of [offset, offset+length).

        ``data`` None writes zeros.  Caller holds self._rmw.
        """
        end = offset + length
        edges = self._edges(offset, length)
        if not edges:
            return
        scratch = bytearray(len(edges) * PAGE_SIZE)
        idx = np.array(edges, dtype=np.uint32)
        self.store.get_many(self.pool, self.obj, idx, scratch)
        for i, page in enumerate(edges):
            start = page * PAGE_SIZE
            lo, hi = max(offset, start), min(end, start + PAGE_SIZE)
            dst = i * PAGE_SIZE + lo - start
            if data is None:
                scratch[dst:dst + hi - lo] = bytes(hi - lo)
            else:
                scratch[dst:dst + hi - lo] = data[lo - offset:hi - offset]
        self.store.put_many(self.pool, self.obj, idx, scratch)

    # -- Backend --------------------------------------------------------------------------------

    def read(self, offset, length, out):
        if length == PAGE_SIZE and offset % PAGE_SIZE == 0:  # the queue-depth-1 latency path
            if self.store.get(self.pool, self.obj, offset // PAGE_SIZE, out) is None:
                out[:PAGE_SIZE] = _ZERO_PAGE  # never written: zeros
            return
        if length == 0:
            return
        first = offset // PAGE_SIZE
        n = (offset + length - 1) // PAGE_SIZE - first + 1
        if offset % PAGE_SIZE == 0 and length % PAGE_SIZE == 0:
            self._get(first, n, out)  # straight into the reply buffer
            return
        scratch = bytearray(n * PAGE_SIZE)
        self._get(first, n, scratch)
        skip = offset - first * PAGE_SIZE
        out[:length] = memoryview(scratch)[skip:skip + length]

    def write(self, offset, data, fua=False):
        data = memoryview(data).cast("B")
        length = len(data)
        first, n = self._inner(offset, length)
        if n:
            skip = first * PAGE_SIZE - offset
            self._put(first, n, data[skip:skip + n * PAGE_SIZE])
        if self._edges(offset, length):
            with self._rmw:
                self._patch_edges(offset, length, data)
        if fua:
            self.flush()

    def trim(self, offset, length):
        first, n = self._inner(offset, length)  # partial pages: a hint we may ignore
        self._invalidate(first, n)

    def zero(self, offset, length, no_hole=False):
        first, n = self._inner(offset, length)
        if no_hole:
            zeros = np.zeros(min(n, RANGE_CHUNK) * PAGE_SIZE, dtype=np.uint8)
            for start in range(first, first + n, RANGE_CHUNK):
                k = min(RANGE_CHUNK, first + n - start)
                self._put(start, k, zeros[:k * PAGE_SIZE])  # the store keeps zero pages without storage
        else:
            self._invalidate(first, n)
        if self._edges(offset, length):
            with self._rmw:
                self._patch_edges(offset, length, None)

    def _invalidate(self, first: int, n: int) -> None:
        for start in range(first, first + n, RANGE_CHUNK):
            k = min(RANGE_CHUNK, first + n - start)
            self.store.invalidate_pages(self.pool, self.obj, self._pages(start, k))

    def flush(self):
        self.store.flush()

    def request_path(self):
        path = self.store.requests
        return None if path is None else (path, (self.pool << 56) | (self.obj << 32))

    def read_pages(self, pages, out):
        self.store.get_many(self.pool, self.obj, pages, out)  # absent pages come back zeroed

    def write_pages(self, pages, data):
        self.store.put_many(self.pool, self.obj, pages, data)
