"""The remote tier: links to providers, virtual slabs with replicas, batched one-sided I/O.

A *virtual slab* is one slab id of the remote allocator backed by ``r`` leased provider slabs of
the same size on distinct nodes; a page at offset X of the virtual slab lives at offset X of
every replica.  Page locations therefore never name a node: re-replication and drain change
this table, not the page map.

Per-slab facts are kept in numpy arrays indexed by slab id (replica address, rkey, link index),
so turning a batch of page locations into per-provider operation arrays is a handful of
vectorised numpy calls, never a Python loop over pages.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from .. import errors
from ..transport import OP_READ, OP_WRITE, completion_error, new_completions, new_ops
from ..transport.base import WC_FATAL_ERR, WC_RETRY_EXC_ERR, WC_SUCCESS, WC_WR_FLUSH_ERR, Endpoint, RemoteRegion
from . import slab as L

log = logging.getLogger(__name__)

#: completion statuses that mean "the provider is gone", not "this operation was wrong"
LINK_FAILURE_STATUSES = {WC_RETRY_EXC_ERR, WC_FATAL_ERR, WC_WR_FLUSH_ERR}


@dataclass
class Link:
    """One provider as seen by this requester: control client + data endpoint."""

    index: int
    name: str
    client: object  # rram.control.client.ProviderClient (or a test double with the same methods)
    endpoint: Endpoint
    lkeys: dict[int, int] = field(default_factory=dict)  # local arena addr -> lkey on this endpoint
    alive: bool = True
    draining: bool = False
    failure_domain: str | None = None
    next_batch: int = 1

    def lkey_for(self, addr: int) -> int:
        return self.lkeys[addr]


@dataclass
class Replica:
    link: int
    lease: object  # provider lease id
    region: RemoteRegion


@dataclass
class VirtualSlab:
    slab_id: int
    size: int
    replicas: list[Replica]
    epoch: int = 0


class RemoteTier:
    """Leases slabs from providers and moves compressed bytes with one-sided READ/WRITE."""

    def __init__(self, *, slab_size: int, replicas: int, first_slab_id: int, max_slabs: int = 1 << 16):
        self.slab_size = slab_size
        self.replicas = replicas
        self.links: list[Link] = []
        self.slabs: dict[int, VirtualSlab] = {}
        self._next_slab = first_slab_id
        self.first_slab_id = first_slab_id
        self._cap = max_slabs
        # per replica slot j: arrays indexed by slab id
        self.rep_addr = np.zeros((replicas, first_slab_id + 64), dtype=np.uint64)
        self.rep_rkey = np.zeros((replicas, first_slab_id + 64), dtype=np.uint32)
        self.rep_link = np.full((replicas, first_slab_id + 64), -1, dtype=np.int32)
        self.rep_ready = np.zeros((replicas, first_slab_id + 64), dtype=bool)  # False while re-replicating
        self.degraded: set[int] = set()  # slab ids with fewer than `replicas` live copies
        self.counters = {"providers_lost": 0, "slabs_rereplicated": 0, "bytes_rereplicated": 0,
                         "slabs_moved": 0, "bytes_moved": 0}
        self.io_timeout = 10.0
        self._ops = {}  # link index -> preallocated ops array
        self._comp = new_completions(64)
        self._lock = threading.RLock()
        self.epoch = 0

    # -- links ---------------------------------------------------------------------------

    def add_link(self, link: Link) -> None:
        link.index = len(self.links)
        self.links.append(link)
        self._ops[link.index] = new_ops(link.endpoint.max_batch)

    def live_links(self) -> list[Link]:
        return [lk for lk in self.links if lk.alive and not lk.draining]

    # -- slabs ---------------------------------------------------------------------------

    def _grow(self, slab_id: int) -> None:
        if slab_id < self.rep_addr.shape[1]:
            return
        new = max(slab_id + 1, self.rep_addr.shape[1] * 2)
        for name in ("rep_addr", "rep_rkey", "rep_link", "rep_ready"):
            old = getattr(self, name)
            fill = -1 if name == "rep_link" else 0
            arr = np.full((old.shape[0], new), fill, dtype=old.dtype)
            arr[:, : old.shape[1]] = old
            setattr(self, name, arr)

    def lease_slab(self, choose_targets) -> VirtualSlab:
        """Lease one virtual slab: ``choose_targets(links, r)`` picks the replica links."""
        targets = choose_targets(self.live_links(), self.replicas)
        if len(targets) < self.replicas:
            raise errors.StoreFullError(
                f"need {self.replicas} providers with {self.slab_size} bytes free, found {len(targets)}"
            )
        replicas: list[Replica] = []
        try:
            for link in targets:
                lease = link.client.alloc_slab(self.slab_size)
                replicas.append(Replica(link.index, lease.lease_id, lease.region))
        except errors.RramError:
            for rep in replicas:
                self._free_lease(rep)
            raise
        slab_id = self._next_slab
        self._next_slab += 1
        vs = VirtualSlab(slab_id, self.slab_size, replicas, self.epoch)
        self._install(vs)
        log.debug("leased slab %d on %s", slab_id, [self.links[r.link].name for r in replicas])
        return vs

    def _install(self, vs: VirtualSlab) -> None:
        self._grow(vs.slab_id)
        self.slabs[vs.slab_id] = vs
        for j, rep in enumerate(vs.replicas):
            self.rep_addr[j, vs.slab_id] = rep.region.addr
            self.rep_rkey[j, vs.slab_id] = rep.region.rkey
            self.rep_link[j, vs.slab_id] = rep.link
            self.rep_ready[j, vs.slab_id] = True

    def _free_lease(self, rep: Replica) -> None:
        link = self.links[rep.link]
        if not link.alive:
            return
        try:
            link.client.free_slab(rep.lease)
        except errors.RramError as exc:
            log.warning("freeing lease %s on %s failed: %s", rep.lease, link.name, exc)

    def release_slab(self, slab_id: int) -> None:
        vs = self.slabs.pop(slab_id)
        for rep in vs.replicas:
            self._free_lease(rep)
        self.rep_link[:, slab_id] = -1
        self.degraded.discard(slab_id)

    def leased_bytes(self) -> int:
        return sum(vs.size * len(vs.replicas) for vs in self.slabs.values())

    # -- I/O -----------------------------------------------------------------------------

    def write(self, remote_locs: np.ndarray, local_addrs: np.ndarray, local_base: int) -> None:
        """WRITE ``size`` bytes from local_addrs[i] to every live replica of remote_locs[i].

        ``local_base`` is the start of the registered local arena the addresses lie in.
        Returns only when every live replica holds every page (acknowledged = durable).  A
        provider that fails meanwhile is marked dead and its slabs degraded (re-replication
        restores them); a page whose every replica failed raises TransportError.
        """
        sizes = L.loc_size(remote_locs).astype(np.uint32)
        slabs = L.loc_slab(remote_locs).astype(np.intp)
        offs = L.loc_offset(remote_locs)
        plans = []
        for j in range(self.replicas):
            link = self.rep_link[j, slabs]
            plans.append((link, self.rep_addr[j, slabs] + offs, self.rep_rkey[j, slabs]))
        failed = self._run(OP_WRITE, plans, local_addrs, sizes, local_base)
        alive = self._alive_mask()
        held = np.zeros(len(slabs), dtype=bool)
        for j in range(self.replicas):
            link = self.rep_link[j, slabs]
            held |= (link >= 0) & alive[np.maximum(link, 0)]
        if not held.all():
            raise errors.TransportError(
                f"{int((~held).sum())} pages could not be written to any live replica"
                + (f" (failed: {', '.join(self.links[i].name for i in failed)})" if failed else "")
            )

    def read(self, remote_locs: np.ndarray, local_addrs: np.ndarray, local_base: int) -> None:
        """READ each page's stored bytes from one live, in-sync replica into local_addrs[i]."""
        sizes = L.loc_size(remote_locs).astype(np.uint32)
        slabs = L.loc_slab(remote_locs).astype(np.intp)
        offs = L.loc_offset(remote_locs)
        todo = np.arange(len(slabs))
        for _attempt in range(self.replicas + 1):
            alive = self._alive_mask()
            link = np.full(len(todo), -1, dtype=np.int32)
            addr = np.zeros(len(todo), dtype=np.uint64)
            rkey = np.zeros(len(todo), dtype=np.uint32)
            s = slabs[todo]
            for j in range(self.replicas):
                cand = self.rep_link[j, s]
                usable = (link < 0) & (cand >= 0) & alive[np.maximum(cand, 0)] & self.rep_ready[j, s]
                link[usable] = cand[usable]
                addr[usable] = self.rep_addr[j, s[usable]] + offs[todo[usable]]
                rkey[usable] = self.rep_rkey[j, s[usable]]
            if (link < 0).any():
                raise errors.TransportError(
                    f"{int((link < 0).sum())} pages have no live replica (providers lost: "
                    f"{', '.join(lk.name for lk in self.links if not lk.alive) or 'none'})"
                )
            failed = self._run(OP_READ, [(link, addr, rkey)], local_addrs[todo], sizes[todo], local_base)
            if not failed:
                return
            todo = todo[np.isin(link, list(failed))]
        raise errors.TransportError("reads kept failing on every replica")

    def _alive_mask(self) -> np.ndarray:
        return np.array([lk.alive for lk in self.links] or [False], dtype=bool)

    def _run(self, opcode, plans, local_addrs, sizes, local_base) -> set[int]:
        """Post one batch per (link, chunk) of every plan, then wait for all of them.

        Returns the links that failed as a whole (now marked dead); raises the first error
        completion (bad key, out of bounds...) since those are bugs, not node failures.
        """
        pending: dict[int, set[int]] = {}
        failed: set[int] = set()
        errs: list[Exception] = []
        for link_idx_arr, raddr, rkey in plans:
            for li in np.unique(link_idx_arr):
                if li < 0 or li in failed or not self.links[int(li)].alive:
                    continue
                link = self.links[int(li)]
                sel = np.flatnonzero(link_idx_arr == li)
                ep = link.endpoint
                lkey = link.lkey_for(local_base)
                for start in range(0, len(sel), ep.max_batch):
                    part = sel[start : start + ep.max_batch]
                    while ep.outstanding >= ep.max_outstanding and link.index not in failed:
                        self._reap(link, pending, failed, errs)
                    if link.index in failed:
                        break
                    ops = self._ops[link.index][: len(part)]
                    ops["opcode"] = opcode
                    ops["local_addr"] = local_addrs[part]
                    ops["remote_addr"] = raddr[part]
                    ops["rkey"] = rkey[part]
                    ops["lkey"] = lkey
                    ops["length"] = sizes[part]
                    batch = link.next_batch
                    link.next_batch += 1
                    try:
                        ep.post(ops, batch)
                    except errors.TransportError as exc:
                        self._link_failed(link, exc, failed)
                        break
                    pending.setdefault(link.index, set()).add(batch)
        for li in list(pending):
            while pending.get(li) and li not in failed:
                self._reap(self.links[li], pending, failed, errs)
        if errs:
            raise errs[0]
        return failed

    def _reap(self, link: Link, pending: dict, failed: set, errs: list) -> None:
        try:
            n = link.endpoint.poll(self._comp, self.io_timeout)
        except errors.TransportError as exc:
            self._link_failed(link, exc, failed)
            return
        if n == 0:
            self._link_failed(link, errors.TransportError(f"no completion in {self.io_timeout}s"), failed)
            return
        for c in self._comp[:n]:
            pending.get(link.index, set()).discard(int(c["batch_id"]))
            status = int(c["status"])
            if status != WC_SUCCESS:
                if status in LINK_FAILURE_STATUSES:
                    self._link_failed(link, completion_error(status, int(c["batch_id"]), int(c["index"])), failed)
                    return
                errs.append(completion_error(status, int(c["batch_id"]), int(c["index"]), link.name))

    def _link_failed(self, link: Link, exc: Exception, failed: set) -> None:
        failed.add(link.index)
        self.mark_dead(link.index, str(exc))

    def mark_dead(self, index: int, why: str) -> None:
        """Stop using a provider at once: its replicas no longer count, its slabs are degraded."""
        link = self.links[index]
        if not link.alive:
            return
        log.warning("provider %s is dead (%s); its slabs are degraded", link.name, why)
        link.alive = False
        self.epoch += 1
        self.counters["providers_lost"] += 1
        for vs in self.slabs.values():
            if any(rep.link == index for rep in vs.replicas):
                self.degraded.add(vs.slab_id)
        for closer in (link.endpoint.close, link.client.close):
            try:
                closer()
            except (errors.RramError, OSError) as exc:
                log.debug("closing dead provider %s: %s", link.name, exc)

    def close(self) -> None:
        for vs in list(self.slabs.values()):
            for rep in vs.replicas:
                self._free_lease(rep)
        self.slabs.clear()
        for link in self.links:
            try:
                link.endpoint.close()
            finally:
                try:
                    link.client.close()
                except errors.RramError as exc:
                    log.debug("closing %s: %s", link.name, exc)
