"""The failover path of the page store's I/O: vectorised numpy, correct in every state.

The fast path (fastpath.py) only completes a batch when nothing unusual happens.  Everything
else comes here, the whole batch at once:

* a page whose replicas are not all usable: a provider died (its slabs are degraded until
  re-replication restores them), or a copy is still being re-replicated (not ready to read);
* a drain or repair in progress: the copy a drain is moving away from is still read (when it is
  the only complete one) and written (so the move does not lose a put that lands meanwhile);
* a link failing mid-batch: a READ is retried on another replica, a WRITE is checked to have
  reached at least one live replica of every page;
* an ephemeral page (one copy) whose provider is suspended or dead: a get misses it;
* a link with batches still outstanding, or a batch larger than a link's ``max_batch``.

``PageStore`` decides which path runs (``_get_locs``, ``_remote_io``);
setting ``store.fast_path = False`` sends every batch here, which the tests use to run the
same checks over both paths.
"""
from __future__ import annotations

import numpy as np

from .. import errors
from ..transport import OP_READ, OP_WRITE
from . import codec
from . import slab as L
from .remote import RemoteTier
from .seal import TAG


class Failover:
    """Reads and writes of remote pages, and whole get batches, for any state of the remote tier."""

    def __init__(self, tier: RemoteTier | None, local_addrs, read_base: int, read_addrs: np.ndarray, opener=None):
        self.tier = tier
        self._local_addrs = local_addrs  # locs -> addresses of their local slots
        self._read_base = read_base  # the registered arena remote pages are READ into
        self._read_addrs = read_addrs  # batch slot i -> its READ target in that arena
        self._open = opener  # PageStore._open_remote when pages are sealed, else None

    def get(self, locs: np.ndarray | int, dst, keys) -> tuple[np.ndarray, int, int, int]:
        """Decompress the pages at looked-up ``locs`` (an array, or one int) of ``keys`` into ``dst``.

        Returns (found, hits, local, remote): the found mask and how many pages were found,
        read from the local pool and read from providers."""
        locs = np.atleast_1d(np.asarray(locs, dtype=np.uint64))
        n = len(locs)
        kind = L.loc_kind(locs)
        found = kind != L.KIND_ABSENT
        stored = kind == L.KIND_STORED
        sizes = np.where(stored, L.loc_size(locs), 0).astype(np.uint32)
        srcs = np.zeros(n, dtype=np.uint64)
        local = L.is_local(locs)
        if local.any():
            srcs[local] = self._local_addrs(locs[local])
        remote = np.flatnonzero(L.is_remote(locs))
        if len(remote):
            rlocs = np.ascontiguousarray(locs[remote])
            addrs = self._read_addrs[remote]
            missed = np.zeros(len(remote), dtype=bool)
            self.read(rlocs, addrs, self._read_base, missed)
            srcs[remote] = addrs
            if missed.any():  # zero-filled, like any other miss of get_many
                gone = remote[missed]
                found[gone] = False
                sizes[gone] = 0
                srcs[gone] = 0
                keep = ~missed
                remote, rlocs, addrs = remote[keep], rlocs[keep], addrs[keep]
            if self._open is not None and len(remote):
                self._open(rlocs, np.atleast_1d(np.asarray(keys, dtype=np.uint64))[remote], addrs)
                sizes[remote] = L.loc_size(rlocs) - TAG
        codec.decompress_pages(srcs, sizes, n, dst)
        return found, int(found.sum()), int(local.sum()), len(remote)

    def read(self, remote_locs: np.ndarray, local_addrs: np.ndarray, local_base: int,
             missed: np.ndarray | None = None) -> None:
        """READ each page's stored bytes from one live, in-sync replica into local_addrs[i].

        Retries on another replica when a link fails; reads the copy a drain is moving away
        from when no other copy is ready; TransportError names the pages with no live replica.
        With ``missed`` (bool per page), ephemeral pages with no live copy are flagged there
        (not read, a miss) instead.
        """
        tier = self.tier
        sizes = L.loc_size(remote_locs).astype(np.uint32)
        slabs = L.loc_slab(remote_locs).astype(np.intp)
        offs = L.loc_offset(remote_locs)
        todo = np.arange(len(slabs))
        for _attempt in range(tier.replicas + 1):
            alive = tier.alive_mask()
            link = np.full(len(todo), -1, dtype=np.int32)
            addr = np.zeros(len(todo), dtype=np.uint64)
            rkey = np.zeros(len(todo), dtype=np.uint32)
            s = slabs[todo]
            for k in range(tier.replicas):
                jj = (s + k) % tier.replicas  # spread reads: each slab starts at its own replica
                cand = tier.rep_link[jj, s]
                usable = (link < 0) & (cand >= 0) & alive[np.maximum(cand, 0)] & tier.rep_ready[jj, s]
                link[usable] = cand[usable]
                addr[usable] = tier.rep_addr[jj[usable], s[usable]] + offs[todo[usable]]
                rkey[usable] = tier.rep_rkey[jj[usable], s[usable]]
            if tier.repairing:  # a slab being moved off a draining node reads from its old copy
                cand = tier.mv_link[0, s]
                usable = (link < 0) & (cand >= 0) & alive[np.maximum(cand, 0)]
                link[usable] = cand[usable]
                addr[usable] = tier.mv_addr[0, s[usable]] + offs[todo[usable]]
                rkey[usable] = tier.mv_rkey[0, s[usable]]
            if missed is not None and (link < 0).any():
                gone = (link < 0) & tier.one_copy[0, s]
                if gone.any():
                    missed[todo[gone]] = True
                    tier.counters["ephemeral_unreachable"] += int(gone.sum())
                    todo, link, addr, rkey = todo[~gone], link[~gone], addr[~gone], rkey[~gone]
                    if not len(todo):
                        return
            if (link < 0).any():
                raise self._no_live_replica(s[link < 0], "have no live replica")
            failed = tier.run_plans(OP_READ, [(link, addr, rkey)], local_addrs[todo], sizes[todo], local_base)
            if not failed:
                return
            tier.counters["read_retries"] += 1  # a replica failed or timed out: read elsewhere
            todo = todo[np.isin(link, list(failed))]
        raise errors.TransportError("reads kept failing on every replica")

    def read_copy(self, remote_locs: np.ndarray, local_addrs: np.ndarray, local_base: int, copy: int,
                  want: np.ndarray) -> np.ndarray | None:
        """READ the pages in ``want`` from their ``copy``-th copy (replicas in read order, then the
        copy a drain is moving away from) where that copy is live: the mask of pages whose copy is
        usable (those in ``want`` were read), or None past the last copy.  Sealed pages that failed
        their tag are read again this way."""
        tier = self.tier
        if copy > tier.replicas:
            return None
        slabs = L.loc_slab(remote_locs).astype(np.intp)
        offs = L.loc_offset(remote_locs)
        alive = tier.alive_mask()
        if copy < tier.replicas:
            jj = (slabs + copy) % tier.replicas
            link, base, rkey = tier.rep_link[jj, slabs], tier.rep_addr[jj, slabs], tier.rep_rkey[jj, slabs]
            usable = (link >= 0) & alive[np.maximum(link, 0)] & tier.rep_ready[jj, slabs]
        else:
            link, base, rkey = tier.mv_link[0, slabs], tier.mv_addr[0, slabs], tier.mv_rkey[0, slabs]
            usable = (link >= 0) & alive[np.maximum(link, 0)]
        link = np.where(usable & want, link, -1).astype(np.int32)
        if (link >= 0).any():
            sizes = L.loc_size(remote_locs).astype(np.uint32)
            failed = tier.run_plans(OP_READ, [(link, base + offs, rkey)], local_addrs, sizes, local_base)
            usable &= ~np.isin(link, list(failed))
        return usable

    def _no_live_replica(self, slabs: np.ndarray, what: str) -> errors.TransportError:
        """The error for pages of ``slabs`` that no live replica holds or took: ReplicaSuspended
        when each still has a replica on a suspended provider (worth waiting for: the caller
        retries once it resumes or is declared dead), else TransportError."""
        tier = self.tier
        suspended = tier.suspended_mask()
        waiting = np.zeros(len(slabs), dtype=bool)
        for k in range(tier.replicas):
            cand = tier.rep_link[k, slabs]
            waiting |= (cand >= 0) & suspended[np.maximum(cand, 0)]
        cls = errors.ReplicaSuspended if waiting.all() else errors.TransportError
        return cls(f"{len(slabs)} pages {what} (providers out of use: "
                   f"{', '.join(lk.name + (' (suspended)' if lk.suspended else '') for lk in tier.links if not lk.alive) or 'none'})")

    def write(self, remote_locs: np.ndarray, local_addrs: np.ndarray, local_base: int) -> None:
        """WRITE each page to every live replica (and to the copy a drain is moving away from).

        A provider that fails meanwhile is suspended (then resumed, or declared dead and its
        slabs re-replicated); a page whose every replica failed raises TransportError, or
        ReplicaSuspended when they are all only suspended (the store retries the whole put).
        """
        tier = self.tier
        sizes = L.loc_size(remote_locs).astype(np.uint32)
        slabs = L.loc_slab(remote_locs).astype(np.intp)
        offs = L.loc_offset(remote_locs)
        plans = []
        for j in range(tier.replicas):
            plans.append((tier.rep_link[j, slabs], tier.rep_addr[j, slabs] + offs, tier.rep_rkey[j, slabs]))
        if tier.repairing:
            plans.append((tier.mv_link[0, slabs], tier.mv_addr[0, slabs] + offs, tier.mv_rkey[0, slabs]))
        failed = tier.run_plans(OP_WRITE, plans, local_addrs, sizes, local_base)
        alive = tier.alive_mask()
        held = np.zeros(len(slabs), dtype=bool)
        for j in range(tier.replicas):
            link = tier.rep_link[j, slabs]
            held |= (link >= 0) & alive[np.maximum(link, 0)]
        if not held.all():
            raise self._no_live_replica(slabs[~held], "could not be written to any live replica")
