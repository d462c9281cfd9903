"""Sealed pages: what a provider stores is encrypted and authenticated, and only the requester can open it.

Between compression and the remote WRITE every image is sealed (ext/_seal.pyx: AES-256-GCM,
one C call a batch, GIL released) into the seal buffer, a registered arena of ``batch`` slots
of ``STRIDE`` bytes: the image followed by its 16-byte tag.  Between the remote READ (into the
same slots) and decompression it is opened in place: by ``PageSeal.open`` (failover path),
``open_one`` (the one-page latency path) or ``PlannedOpen`` (the fast path's batches, one C
call per ~64 KiB of READs as they land, version lookup included); all three open through the same
``Sealer`` and recover failed pages the same way.

The key is ``os.urandom(32)`` per store: pages never outlive the requester process that wrote
them (its page map is in memory only), so nothing needs to survive a restart, and the key is
never derived from the cluster secret (providers hold that).  Each seal takes a fresh 64-bit
*version*, kept as the remote slot's owner word in the remote allocator (8 bytes a remote page);
nonce and associated data bind the image to (requester, page key, version), so a provider
cannot swap two pages or put back an older image of the same page.

A page whose tag fails is read again from each of its replicas in turn (and from the copy a
drain is moving away from) until one opens; every failed tag is counted (``seal_failures``).
When none opens, the read raises SealError: never wrong bytes, never zeros.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .. import errors
from .._ext._seal import ALGORITHM, STRIDE, TAG, PlannedReads, Sealer
from ..memory import Arena
from . import slab as L

__all__ = ["ALGORITHM", "STRIDE", "TAG", "PageSeal"]


class PageSeal:
    """A store's sealer, its seal buffer, and recovery from other replicas; see the module docstring."""

    def __init__(self, batch: int, requester: str = ""):
        #: bound into every page's associated data; the key alone already separates requesters
        rid = int.from_bytes(hashlib.blake2b(requester.encode(), digest_size=8).digest(), "little")
        self.sealer = Sealer(os.urandom(32), rid)
        self.batch = batch
        self.buf = Arena(batch * STRIDE)  # registered with every link (PageStore._register_arenas)
        self.base = self.buf.addr
        self.addrs = self.base + np.arange(batch, dtype=np.uint64) * np.uint64(STRIDE)
        self._versions = np.zeros(batch, dtype=np.uint64)
        self._ok = np.zeros(batch, dtype=np.uint8)
        self.recovered = 0  # pages that failed once and opened from another copy

    @property
    def failures(self) -> int:
        """Tags that did not verify, each copy tried counted once: the sealer's own count (the C
        request path's opens do not count, since Python reads that copy again after it declines)."""
        return self.sealer.failures

    def close(self) -> None:
        self.buf.close()

    # -- the way out ----------------------------------------------------------------------

    def versions(self, n: int) -> np.ndarray:
        """n fresh versions (a scratch array, valid until the next call)."""
        self.sealer.take_versions(self._versions, n)
        return self._versions[:n]

    def seal(self, keys: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """Seal the images at ``srcs`` into the seal buffer's first len(keys) slots; their addresses."""
        n = len(keys)
        self.sealer.seal(np.ascontiguousarray(srcs, dtype=np.uint64), self.addrs, np.ascontiguousarray(sizes, dtype=np.uint32),
                         np.ascontiguousarray(keys, dtype=np.uint64), versions, n)
        return self.addrs[:n]

    # -- the way in -----------------------------------------------------------------------

    def open(self, rlocs: np.ndarray, keys: np.ndarray, addrs: np.ndarray, versions: np.ndarray, reread) -> None:
        """Open the sealed images of remote pages ``rlocs`` (READ to ``addrs``) in place.

        ``versions``: each page's version (the remote allocator's owner word).  A page that fails
        is read again from each of its other copies in turn, through ``reread(rlocs, addrs, copy,
        want) -> usable mask`` (Failover.read_copy); SealError when no copy opens.
        """
        n = len(rlocs)
        if n == 0:
            return
        sizes = L.loc_size(rlocs).astype(np.uint32)
        ok = self._ok[:n] if n <= self.batch else np.zeros(n, dtype=np.uint8)
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        bad = self.sealer.open(addrs, sizes, keys, versions, n, ok)
        if bad:
            self._recover(np.flatnonzero(ok == 0), rlocs, keys, addrs, sizes, versions, reread)

    def open_one(self, loc: int, key: int, addr: int, version: int, reread) -> None:
        """``open`` for one page (the latency path: arrays only when its tag fails)."""
        if self.sealer.open_page(addr, (loc >> L.SIZE_SHIFT) & L.SIZE_FIELD, key, version):
            return
        self._recover(np.zeros(1, dtype=np.intp), np.array([loc], dtype=np.uint64), np.array([key], dtype=np.uint64),
                      np.array([addr], dtype=np.uint64), np.array([L.loc_size(loc)], dtype=np.uint32),
                      np.array([version], dtype=np.uint64), reread)

    def _recover(self, bad, rlocs, keys, addrs, sizes, versions, reread) -> None:
        """Read the pages at ``bad`` from each of their other copies until one opens."""
        todo = bad
        seen = np.zeros(len(rlocs), dtype=bool)  # the first usable copy is the one that failed
        copy = 0
        while len(todo):
            sub = np.ascontiguousarray(rlocs[todo])
            got = reread(sub, np.ascontiguousarray(addrs[todo]), copy, seen[todo])
            if got is None:  # no copies left to try
                break
            copy += 1
            idx = todo[got & seen[todo]]
            seen[todo[got]] = True
            if not len(idx):
                continue
            ok = np.zeros(len(idx), dtype=np.uint8)
            failed = self.sealer.open(np.ascontiguousarray(addrs[idx]), np.ascontiguousarray(sizes[idx]),
                                      np.ascontiguousarray(keys[idx]), np.ascontiguousarray(versions[idx]), len(idx), ok)
            self.recovered += len(idx) - failed
            todo = np.setdiff1d(todo, idx[ok.astype(bool)], assume_unique=True)
        if len(todo):
            raise errors.SealError(
                f"{len(todo)} page(s) failed their seal on every copy (altered, swapped or replayed by a "
                f"provider, or corrupted): first key {int(keys[todo[0]]):#x}")


class PlannedOpen:
    """Opens the remote pages of the fast path's planned get batch as their READs land
    (``landed``: ``run_routed``'s ``on_done``, once a link or a chunk of one), in one C call
    each; ``finish`` then recovers any page whose tag failed from its other copies.  One per
    store, reused by every batch (the store's lock is held throughout)."""

    def __init__(self, seal: PageSeal, versions_r, versions_e, owners, reread, logged):
        self.seal = seal
        #: the C side: the batch's arrays bound once (``start``), each landing opened in C
        self.reads = PlannedReads(seal.sealer, seal.base, STRIDE, versions_r, versions_e)
        self.landed = self.reads.landed  # (ops, start, end) -> failures; bound once, called per chunk
        self.owners = owners  # rlocs -> versions, for recovery (PageStore._owners)
        self.reread = reread  # as ``PageSeal.open``'s
        self.logged = logged  # called with the failure count before, once recovery is over
        self.locs = self.keys = self.sizes = None
        self.n = 0

    def start(self, locs: np.ndarray, keys: np.ndarray, sizes: np.ndarray) -> PlannedOpen:
        """A new batch: ``locs``/``keys`` (uint64) planned, ``sizes`` (uint32, stored sizes: cut
        to the images' as pages open)."""
        self.locs, self.keys, self.sizes, self.n = locs, keys, sizes, len(locs)
        self.reads.start(locs, keys, sizes, self.seal._ok, self.n)
        return self

    def finish(self, srcs: np.ndarray) -> None:
        """After the last link: recover the pages that failed (SealError when no copy opens)."""
        bad = self.reads.bad
        if not bad:
            return
        seal, n = self.seal, self.n
        before = seal.failures - bad  # the sealer counted them as they failed
        try:
            ok = seal._ok[:n]
            idx = np.flatnonzero(L.is_remote(self.locs) & (ok == 0))  # each remote page was READ, so opened
            rlocs = np.ascontiguousarray(self.locs[idx])
            seal._recover(np.arange(len(idx)), rlocs, np.ascontiguousarray(self.keys[idx], dtype=np.uint64),
                          np.ascontiguousarray(srcs[idx], dtype=np.uint64), L.loc_size(rlocs).astype(np.uint32),
                          self.owners(rlocs), self.reread)
            self.sizes[idx] -= np.uint32(TAG)
        finally:
            self.logged(before)


def payload_sizes(sizes: np.ndarray, remote_idx: np.ndarray) -> None:
    """After ``open``: the remote entries of a decompress batch are TAG bytes shorter."""
    sizes[remote_idx] -= np.uint32(TAG)
