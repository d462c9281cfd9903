"""The remote tier: links to providers, virtual slabs with replicas, the engine of one-sided I/O.

A *virtual slab* is one slab id of the remote allocator backed by ``r`` leased provider slabs of
the same size on distinct nodes; a page at offset X of the virtual slab lives at offset X of
every replica.  Page locations therefore never name a node: re-replication and drain change
this table, not the page map.

Slabs of ephemeral pages (tmem's cleancache-like pools, where a miss is allowed) have one copy
and are never repaired: when their provider dies, leaves (drain) or wants memory back
(reclaim), or when a write to them may have half landed, they go to ``dropped`` and the store
forgets their pages, which miss from then on.

Per-slab facts are kept in numpy arrays indexed by slab id (replica address, rkey, link index).
This module owns those tables and the engine that posts batches and reaps completions
(``run_routed`` for what the C router wrote, ``run_plans`` for numpy plans), suspends links
that fail or time out (the keeper resumes them or declares them dead), and repairs degraded
slabs (re-replication, drain and reclaim moves, resync of copies that missed writes).  Which operations a get or put posts is decided by the two
paths above it: fastpath.py (the common case, in C) and failover.py (every other case).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .. import errors
from .._ext._storepath import Router
from ..transport import OP_READ, OP_WRITE, completion_error, new_completions, new_ops
from ..transport.base import (WC_FATAL_ERR, WC_REM_ACCESS_ERR, WC_RETRY_EXC_ERR, WC_SUCCESS, WC_WR_FLUSH_ERR,
                              Endpoint, RemoteRegion)
from . import slab as L

log = logging.getLogger(__name__)

#: completion statuses that suspend the provider (its copies are read and written elsewhere
#: until the keeper resumes it or buries it) instead of failing the operation.  A remote access
#: error is one: when a provider process dies, soft-RoCE's kernel QP outlives its memory
#: regions for a moment and answers the READs in flight with it (seen in the VM: FarMemory's
#: handler failed on it although the other replica held every page).  Were it a wrong key
#: instead, the resumed provider fails again and the operation fails once no copy is left.
LINK_FAILURE_STATUSES = {WC_RETRY_EXC_ERR, WC_FATAL_ERR, WC_WR_FLUSH_ERR, WC_REM_ACCESS_ERR}


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
    slabs_placed: int = 0
    incarnation: int | None = None  # the provider's start time, from its first heartbeat: a restart changes it
    #: out of use after a timeout or a broken connection, not (yet) dead: its copies are kept
    #: and read again if it resumes; ``missed`` are the slabs whose writes skipped it meanwhile
    suspended: bool = False
    missed: set[int] = field(default_factory=set)
    unfreed: list = field(default_factory=list)  # leases released while suspended: freed on resume
    reported_degraded: int = 0  # the degraded-slab count this provider last heard from us

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
    replicas: list[Replica | None]  # None: a missing copy (degraded slab)
    #: one copy of ephemeral pages: never degraded nor repaired, dropped when that copy is gone
    ephemeral: bool = False


class RemoteTier:
    """Leases slabs from providers and moves compressed bytes with one-sided READ/WRITE."""

    def __init__(self, *, slab_size: int, replicas: int, first_slab_id: int = L.FIRST_REMOTE_SLAB,
                 io_timeout: float = 10.0, read_timeout: float | None = None, min_replicas: int = 1,
                 suspension_wait: float = 0.0):
        if first_slab_id < L.FIRST_REMOTE_SLAB:  # below it, slab ids name local pool slabs
            raise ValueError(f"remote slab ids start at {L.FIRST_REMOTE_SLAB} or above, not {first_slab_id}")
        self.slab_size = slab_size
        self.replicas = replicas
        #: live copies a persistent write needs (callers pass ``min_copies``); fewer: ReplicationError
        self.min_replicas = min_replicas
        self.links: list[Link] = []
        self.slabs: dict[int, VirtualSlab] = {}
        self._next_slab = first_slab_id
        self.first_slab_id = first_slab_id
        # per replica slot j: arrays indexed by slab id
        self.rep_addr = np.zeros((replicas, first_slab_id + 64), dtype=np.uint64)
        self.rep_rkey = np.zeros((replicas, first_slab_id + 64), dtype=np.uint32)
        self.rep_link = np.full((replicas, first_slab_id + 64), -1, dtype=np.int32)
        self.rep_ready = np.zeros((replicas, first_slab_id + 64), dtype=bool)  # False while re-replicating
        # the copy a drain is moving away from: still read and written until the move completes
        self.mv_link = np.full((1, first_slab_id + 64), -1, dtype=np.int32)
        self.mv_addr = np.zeros((1, first_slab_id + 64), dtype=np.uint64)
        self.mv_rkey = np.zeros((1, first_slab_id + 64), dtype=np.uint32)
        self.one_copy = np.zeros((1, first_slab_id + 64), dtype=bool)  # row 0: the slab is ephemeral
        self.degraded: set[int] = set()  # slab ids with fewer than `replicas` live copies
        self.evicting: set[tuple[int, int]] = set()  # (slab id, link): copies a reclaim moves away
        #: ephemeral slabs to forget, and the store counter their pages go to: "ephemeral_lost"
        #: (the copy died or may hold a half-landed write) or "ephemeral_dropped" (drain, reclaim)
        self.dropped: dict[int, str] = {}
        self.counters = {"providers_lost": 0, "slabs_rereplicated": 0, "bytes_rereplicated": 0,
                         "slabs_moved": 0, "bytes_moved": 0, "slabs_lost": 0, "providers_suspended": 0,
                         "providers_resumed": 0, "slabs_resynced": 0, "bytes_resynced": 0, "read_retries": 0,
                         "stale_completions": 0, "slabs_leased_degraded": 0, "ephemeral_unreachable": 0}
        # slab id -> [replica slot, next offset, old replica, "copy" | "resync"]
        self._repair: dict[int, list] = {}
        #: a batch not complete after this long suspends its link (writes, repair copies)
        self.io_timeout = io_timeout
        #: reads give up on a replica sooner and go to another one (hedged reads): a hung
        #: provider costs a read this long, not the time it takes to declare it dead
        self.read_timeout = io_timeout if read_timeout is None else read_timeout
        #: how long a read whose only live copies sit on suspended providers waits for one of
        #: them to resume (or be declared dead) instead of failing at once: a lossy or briefly
        #: silent link to the last replica stalls swap rather than failing it
        self.suspension_wait = suspension_wait
        self._ops = {}  # link index -> preallocated ops array
        self._comp = new_completions(64)
        self._comp_batch = self._comp["batch_id"]  # field views: the fast path checks one completion
        self._comp_status = self._comp["status"]
        # the C router over the tables above, bound again when links, tables or lkeys change:
        # route_generation moves on every such change, the router remembers the one it saw
        self.route_generation = 0
        self._router = Router()
        self._bound_generation = -1
        self._lkeys: dict[int, np.ndarray] = {}  # local arena addr -> lkey per link (-1: none)
        #: called (no arguments, under the store's lock) by every ``invalidate_routes``: the
        #: store's C request path stops using its binding of the router at once
        self.route_listeners: list = []

    # -- links ---------------------------------------------------------------------------

    def add_link(self, link: Link) -> None:
        link.index = len(self.links)
        self.links.append(link)
        self._ops[link.index] = new_ops(link.endpoint.max_batch)
        self.invalidate_routes()

    def live_links(self) -> list[Link]:
        return [lk for lk in self.links if lk.alive and not lk.draining]

    # -- slabs ---------------------------------------------------------------------------

    def _grow(self, slab_id: int) -> None:
        if slab_id < self.rep_addr.shape[1]:
            return
        new = max(slab_id + 1, self.rep_addr.shape[1] * 2)
        for name in ("rep_addr", "rep_rkey", "rep_link", "rep_ready", "mv_link", "mv_addr", "mv_rkey", "one_copy"):
            old = getattr(self, name)
            fill = -1 if name.endswith("_link") else 0
            arr = np.full((old.shape[0], new), fill, dtype=old.dtype)
            arr[:, : old.shape[1]] = old
            setattr(self, name, arr)
        self.invalidate_routes()

    def lease_slab(self, place, min_copies: int = 1, ephemeral: bool = False) -> VirtualSlab:
        """Lease one virtual slab on up to ``replicas`` distinct live providers (one when ``ephemeral``).

        ``place(candidates, n, chosen) -> links`` is the placement policy (preference
        order).  A provider that is full or unreachable is skipped for the next one.  With
        fewer live providers than ``replicas`` the slab starts degraded (a WARNING;
        re-replication completes it when providers join); with none, StoreFullError; with
        fewer than ``min_copies``, ReplicationError (and nothing stays leased).
        """
        copies = 1 if ephemeral else self.replicas
        chosen: list[Link] = []
        leases: list[Replica] = []
        excluded: set[int] = set()
        while len(chosen) < copies:
            taken = {lk.index for lk in chosen} | excluded
            cands = [lk for lk in self.live_links() if lk.index not in taken]
            picks = place(cands, copies - len(chosen), chosen) if cands else []
            if not picks:
                break
            for link in picks:
                try:
                    lease = link.client.alloc_slab(self.slab_size)
                except errors.CapacityError as exc:
                    log.debug("provider %s full: %s", link.name, exc)
                    excluded.add(link.index)
                    continue
                except (errors.ConnectionLost, errors.ProtocolError, OSError) as exc:
                    excluded.add(link.index)
                    self.suspend(link.index, f"lease failed: {exc}")
                    continue
                chosen.append(link)
                leases.append(Replica(link.index, lease.lease_id, lease.region))
        if not leases:
            raise errors.StoreFullError(f"no live provider has {self.slab_size} bytes free for a slab")
        if len(leases) < min_copies:
            for r in leases:
                self._free_lease(r)
            raise errors.ReplicationError(
                f"only {len(leases)} live provider(s) could lease a slab, min_replicas is {min_copies}: "
                "refusing a persistent write with fewer copies")
        slab_id = self._next_slab
        self._next_slab += 1
        vs = VirtualSlab(slab_id, self.slab_size, leases + [None] * (copies - len(leases)), ephemeral)
        self._install(vs)
        if len(leases) < copies:
            self.degraded.add(slab_id)
            self.counters["slabs_leased_degraded"] += 1
            log.warning("slab %d has %d of %d replicas until more providers are available",
                        slab_id, len(leases), self.replicas)
        return vs

    def _install(self, vs: VirtualSlab) -> None:
        self._grow(vs.slab_id)
        self.slabs[vs.slab_id] = vs
        self.one_copy[0, vs.slab_id] = vs.ephemeral
        for j, rep in enumerate(vs.replicas):
            self._set_replica(vs.slab_id, j, rep, ready=True)

    def _set_replica(self, slab_id: int, j: int, rep: Replica | None, ready: bool) -> None:
        self.rep_addr[j, slab_id] = rep.region.addr if rep else 0
        self.rep_rkey[j, slab_id] = rep.region.rkey if rep else 0
        self.rep_link[j, slab_id] = rep.link if rep else -1
        self.rep_ready[j, slab_id] = ready and rep is not None

    def _free_lease(self, rep: Replica | None) -> None:
        if rep is None:
            return
        link = self.links[rep.link]
        if link.suspended:
            link.unfreed.append(rep.lease)
        if not link.alive:
            return
        try:
            link.client.free_slab(rep.lease)
        except errors.RramError as exc:
            log.warning("freeing lease %s on %s failed: %s", rep.lease, link.name, exc)

    def release_slab(self, slab_id: int) -> None:
        vs = self.slabs.pop(slab_id)
        if self.evicting:
            self.evicting = {e for e in self.evicting if e[0] != slab_id}
        for rep in vs.replicas:
            self._free_lease(rep)
        self.rep_link[:, slab_id] = -1
        self.mv_link[0, slab_id] = -1
        self.one_copy[0, slab_id] = False
        self.dropped.pop(slab_id, None)
        state = self._repair.pop(slab_id, None)
        if state is not None:
            self._free_lease(state[2])
        self.degraded.discard(slab_id)

    def leased_bytes(self) -> int:
        return sum(vs.size for vs in self.slabs.values() for rep in vs.replicas if rep is not None)

    # -- I/O -----------------------------------------------------------------------------

    @property
    def repairing(self) -> bool:
        """A repair or drain is copying a slab: its old copy must still be read and written."""
        return bool(self._repair)

    def invalidate_routes(self) -> None:
        """Links, their state or lkeys, or the table arrays changed: bind the router again before its next use."""
        self.route_generation += 1
        for unbind in self.route_listeners:
            unbind()

    def router(self, local_base: int) -> tuple[Router, np.ndarray]:
        """The C router, current with the links and tables, and the lkeys of the arena at ``local_base``.

        Bound again after ``invalidate_routes`` (a link died, joined or started draining, the
        arrays grew); between those only table values change, in place.
        """
        if self._bound_generation != self.route_generation:
            self._router.bind(self.rep_link, self.rep_addr, self.rep_rkey, self.rep_ready.view(np.uint8),
                              [lk.alive for lk in self.links], [self._ops[lk.index] for lk in self.links])
            self._lkeys = {}
            self._bound_generation = self.route_generation
        lkeys = self._lkeys.get(local_base)
        if lkeys is None:
            lkeys = np.array([lk.lkeys.get(local_base, -1) for lk in self.links] or [-1], dtype=np.int64)
            self._lkeys[local_base] = lkeys
        return self._router, lkeys

    def note_missed(self, remote_locs: np.ndarray) -> None:
        """After a write: the slabs it touched are stale on every suspended link holding a copy."""
        suspended = [lk.index for lk in self.links if lk.suspended]
        if not suspended:
            return
        slabs = np.unique(L.loc_slab(remote_locs).astype(np.intp))
        for j in range(self.replicas):
            link = self.rep_link[j, slabs]
            for li in suspended:
                self.links[li].missed.update(slabs[link == li].tolist())

    def require_copies(self, remote_locs: np.ndarray, min_copies: int, when: str) -> None:
        """ReplicationError unless every page's slab has ``min_copies`` copies on live links."""
        if min_copies <= 1:
            return
        slabs = np.unique(L.loc_slab(remote_locs).astype(np.intp))
        alive = self.alive_mask()
        link = self.rep_link[:, slabs]
        copies = ((link >= 0) & alive[np.maximum(link, 0)]).sum(axis=0)
        short = slabs[copies < min_copies]
        if len(short):
            raise errors.ReplicationError(
                f"{len(short)} slab(s) have {int(copies.min())} live copies {when} the write, min_replicas is "
                f"{min_copies} (providers out: {', '.join(lk.name for lk in self.links if not lk.alive) or 'none'})")

    def held(self, remote_locs: np.ndarray) -> np.ndarray:
        """Per page: its slab has a copy on a live link (True) or none left to read or write."""
        slabs = L.loc_slab(remote_locs).astype(np.intp)
        alive = self.alive_mask()
        link = self.rep_link[:, slabs]
        return ((link >= 0) & alive[np.maximum(link, 0)]).any(axis=0)

    def drop(self, slab_ids, counter: str) -> None:
        """Ephemeral slabs whose pages the store is to forget; ``counter``: where their pages count."""
        for slab_id in slab_ids:
            if slab_id in self.slabs:
                self.dropped.setdefault(int(slab_id), counter)

    def alive_mask(self) -> np.ndarray:
        """Per link index: alive (a 1-element False array when there are no links)."""
        return np.array([lk.alive for lk in self.links] or [False], dtype=bool)

    def suspended_mask(self) -> np.ndarray:
        """Per link index: suspended (out of use, not dead: it may resume)."""
        return np.array([lk.suspended for lk in self.links] or [False], dtype=bool)

    def run_routed(self, batches: list[tuple[int, int]], timeout: float | None = None,
                   on_done=None, chunked: bool = False) -> set[int] | None:
        """Post the batches the router wrote (one per link) and wait for every one of them.

        ``timeout``: how long a link may take before it is suspended; default ``read_timeout``
        (a get's batches are reads; writes pass ``io_timeout``).  ``on_done(ops, start, end)``:
        called with ``ops[start:end]`` of a link's op array as soon as that batch has succeeded,
        before the next link is waited for (the fast path opens sealed pages there, while the
        other links' READs are in flight); the array and bounds rather than a slice, since a
        structured view costs its consumer ~3 us to export as a buffer, once a ~64 KiB chunk.
        ``chunked`` (gets): post each link's ops in batches of about its endpoint's
        ``read_chunk`` bytes and call ``on_done`` as each lands, so that its work overlaps the
        transfer of the next even when one link serves the whole batch.

        Returns the links that failed as a whole (now marked dead; the failover path redoes the
        I/O), or None when nothing was posted because a link still has batches outstanding (the
        failover path reaps them).  Raises the first error completion (bad key, out of
        bounds...), like ``run_plans``.
        """
        links = self.links
        timeout = self.read_timeout if timeout is None else timeout
        for li, _count in batches:
            if links[li].endpoint.outstanding:
                return None
        failed: set[int] = set()
        errs: list[Exception] = []
        posted = []
        for li, count in batches:
            link = links[li]
            ops = self._ops[li]
            parts = []
            for start, end in _chunks(ops, count, link.endpoint) if chunked else ((0, count),):
                batch = link.next_batch
                link.next_batch += 1
                try:
                    link.endpoint.post(ops[start:end], batch)
                except errors.TransportError as exc:
                    self._link_failed(link, exc, failed)  # its posted chunks complete stale, if ever
                    break
                parts.append((batch, start, end))
            else:
                posted.append((link, parts))
        for link, parts in posted:
            if len(parts) == 1:
                batch, start, end = parts[0]
                self._wait(link, batch, failed, errs, timeout)
                if on_done is not None and not errs and link.index not in failed:
                    on_done(self._ops[link.index], start, end)
                continue
            self._wait_parts(link, parts, failed, errs, timeout, on_done)
        if errs:
            raise errs[0]
        return failed

    def _wait_parts(self, link: Link, parts: list, failed: set, errs: list, timeout: float, on_done) -> None:
        """Reap the chunks of one link's batch (``run_routed``), handing each to ``on_done`` as it
        lands: a link completes its batches in the order they were posted."""
        mine = {batch for batch, _s, _e in parts}
        pending = {link.index: mine}
        done = 0
        while mine and link.index not in failed:
            self._reap(link, pending, failed, errs, timeout)
            while done < len(parts) and parts[done][0] not in mine and not errs and link.index not in failed:
                if on_done is not None:
                    on_done(self._ops[link.index], parts[done][1], parts[done][2])
                done += 1

    def _wait(self, link: Link, batch: int, failed: set, errs: list, timeout: float) -> None:
        """Reap the one batch posted on ``link``; anything but its lone success goes through ``_take``."""
        n = self._poll(link, failed, timeout)
        if n is None:
            return
        if n == 1 and self._comp_batch[0] == batch and self._comp_status[0] == WC_SUCCESS:
            return
        pending = {link.index: {batch}}
        self._take(link, n, pending, failed, errs, timeout)
        while pending[link.index] and link.index not in failed:
            self._reap(link, pending, failed, errs, timeout)

    def run_plans(self, opcode, plans, local_addrs, sizes, local_base) -> set[int]:
        """Post one batch per (link, chunk) of every plan, then wait for all of them.

        Returns the links that failed as a whole (now marked dead); raises the first error
        completion (bad key, out of bounds...) since those are bugs, not node failures.
        """
        pending: dict[int, set[int]] = {}
        failed: set[int] = set()
        errs: list[Exception] = []
        timeout = self.read_timeout if opcode == OP_READ else self.io_timeout
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
                        self._reap(link, pending, failed, errs, timeout)
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
                self._reap(self.links[li], pending, failed, errs, timeout)
        if errs:
            raise errs[0]
        return failed

    def _reap(self, link: Link, pending: dict, failed: set, errs: list, timeout: float) -> None:
        n = self._poll(link, failed, timeout)
        if n is not None:
            self._take(link, n, pending, failed, errs, timeout)

    def _poll(self, link: Link, failed: set, timeout: float) -> int | None:
        """One poll of ``link`` into ``self._comp``: the completions, or None when the link failed (suspended)."""
        try:
            return link.endpoint.poll(self._comp, timeout)
        except errors.TransportError as exc:
            self._link_failed(link, exc, failed)
            return None

    def _take(self, link: Link, n: int, pending: dict, failed: set, errs: list, timeout: float) -> None:
        """Account for the ``n`` completions a poll of ``link`` left in ``self._comp`` (0: it timed out)."""
        if n == 0:
            self._link_failed(link, errors.TransportError(f"no completion in {timeout:g}s"), failed)
            return
        mine = pending.get(link.index, set())
        for c in self._comp[:n]:
            batch = int(c["batch_id"])
            if batch not in mine:
                # a batch given up on when the link was suspended, completing now: its I/O was
                # redone elsewhere, and its error (its buffers were deregistered under it: a
                # local protection error) is not this call's
                self.counters["stale_completions"] += 1
                continue
            mine.discard(batch)
            status = int(c["status"])
            if status != WC_SUCCESS:
                if status in LINK_FAILURE_STATUSES:
                    self._link_failed(link, completion_error(status, int(c["batch_id"]), int(c["index"])), failed)
                    return
                errs.append(completion_error(status, int(c["batch_id"]), int(c["index"]), link.name))

    def _link_failed(self, link: Link, exc: Exception, failed: set) -> None:
        failed.add(link.index)
        self.suspend(link.index, str(exc))

    def suspend(self, index: int, why: str) -> None:
        """Stop I/O to a provider that timed out or whose connection broke, without giving up on it.

        Its copies stay in the tables; reads go to other replicas, writes skip it and note
        the slabs in ``missed``.  The keeper then either ``resume``s it (the copies it missed
        are copied again, nothing else) or, when it stays silent, marks it dead.

        Our buffers are deregistered from its endpoint at once: a READ answered late (verbs
        DMAs it without our polling) must not land in a staging buffer that another batch
        uses by then.  The store registers them again when the link resumes.
        """
        link = self.links[index]
        if not link.alive:
            return
        log.warning("provider %s suspended (%s): no I/O to it until it resumes or is declared dead",
                    link.name, why)
        link.alive = False
        link.suspended = True
        self.invalidate_routes()
        self.counters["providers_suspended"] += 1
        for lkey in link.lkeys.values():
            try:
                link.endpoint.deregister_local(lkey)
            except (errors.RramError, OSError) as exc:
                log.debug("deregistering local memory from %s: %s", link.name, exc)
        link.lkeys.clear()
        self.invalidate_routes()

    def resume(self, index: int) -> int:
        """A suspended provider is back with its leases (endpoint recovered): use it again.

        The copies it holds of slabs written meanwhile are stale: they are not read until
        ``repair_step`` has copied them again in place.  Returns how many.
        """
        link = self.links[index]
        if not link.suspended:
            return 0
        stale = 0
        for slab_id in link.missed:
            vs = self.slabs.get(slab_id)
            if vs is None:
                continue
            if vs.ephemeral:  # its one copy missed a write: nothing to resync from
                self.drop([slab_id], "ephemeral_lost")
                continue
            for j, rep in enumerate(vs.replicas):
                if rep is not None and rep.link == index:
                    self.rep_ready[j, slab_id] = False
                    self.degraded.add(slab_id)
                    stale += 1
        link.missed.clear()
        link.suspended = False
        link.alive = True
        self.invalidate_routes()
        self.counters["providers_resumed"] += 1
        log.info("provider %s resumed; %d of its slab copies missed writes and are copied again", link.name, stale)
        return stale

    def mark_dead(self, index: int, why: str) -> None:
        """Stop using a provider for good: its replicas no longer count, its slabs are degraded."""
        link = self.links[index]
        if not link.alive and not link.suspended:
            return
        log.warning("provider %s is dead (%s); its slabs are degraded", link.name, why)
        link.alive = False
        link.suspended = False
        link.missed.clear()
        self.invalidate_routes()
        self.counters["providers_lost"] += 1
        for vs in self.slabs.values():
            if any(rep is not None and rep.link == index for rep in vs.replicas):
                if vs.ephemeral:  # its one copy is gone: the pages miss from now on
                    self.drop([vs.slab_id], "ephemeral_lost")
                else:
                    self.degraded.add(vs.slab_id)
        for closer in (link.endpoint.close, link.client.abort):  # never wait on a hung node
            try:
                closer()
            except (errors.RramError, OSError) as exc:
                log.debug("closing dead provider %s: %s", link.name, exc)

    # -- repair: re-replication and drain ------------------------------------------------

    def _needs_move(self, rep: Replica | None, slab_id: int) -> bool:
        """A copy to replace elsewhere: missing, on a dead link, on a draining one or evicted by a
        reclaim (not one on a suspended link: it may come back)."""
        if rep is None:
            return True
        link = self.links[rep.link]
        return (not link.alive and not link.suspended) or link.draining or (slab_id, rep.link) in self.evicting

    def evict(self, index: int, slab_ids) -> int:
        """Move the copies of ``slab_ids`` off provider ``index`` (a reclaim); ``repair_step``
        copies them elsewhere, then frees them there; ephemeral slabs are dropped instead.
        Returns how many were scheduled."""
        n = 0
        for slab_id in slab_ids:
            vs = self.slabs.get(slab_id)
            if vs is not None and any(r is not None and r.link == index for r in vs.replicas):
                n += 1
                if vs.ephemeral:
                    self.drop([slab_id], "ephemeral_dropped")
                    continue
                self.evicting.add((slab_id, index))
                self.degraded.add(slab_id)
        return n

    def _waiting(self, vs: VirtualSlab) -> bool:
        """A copy of ``vs`` sits on a suspended link: wait for it rather than call the slab lost."""
        return any(rep is not None and self.links[rep.link].suspended for rep in vs.replicas)

    def _source(self, vs: VirtualSlab, skip: int, old: Replica | None) -> Replica | None:
        """A live, complete copy of ``vs`` to copy from: another replica, else the one being moved."""
        for k, rep in enumerate(vs.replicas):
            if k != skip and rep is not None and self.links[rep.link].alive and self.rep_ready[k, vs.slab_id]:
                return rep
        if old is not None and self.links[old.link].alive:
            return old  # drain of a single copy: the draining node itself is the source
        return None

    def start_drain(self, index: int) -> int:
        """Stop placing on provider ``index`` and schedule moving its slabs; returns their number.

        Its ephemeral slabs are dropped, not moved: their pages may miss, and a drain should
        not spend the network on copies the kernel can read again from disk."""
        link = self.links[index]
        link.draining = True
        self.invalidate_routes()
        mine = [vs for vs in self.slabs.values() if any(rep is not None and rep.link == index for rep in vs.replicas)]
        self.drop([vs.slab_id for vs in mine if vs.ephemeral], "ephemeral_dropped")
        move = [vs.slab_id for vs in mine if not vs.ephemeral]
        self.degraded.update(move)
        return len(move)

    def slabs_on(self, index: int) -> int:
        return sum(1 for vs in self.slabs.values() if any(r is not None and r.link == index for r in vs.replicas))

    def repair_step(self, place, staging_addr: int, staging_len: int) -> int:
        """Copy one chunk toward restoring a degraded slab or moving one off a draining node.

        Call under the store's lock: a chunk is copied (READ from a live replica, WRITE to the
        new one) atomically with respect to puts, and puts that land meanwhile already go to
        the new replica too.  Returns the bytes copied; 0 when there is nothing to do now.
        """
        chunk = min(staging_len, 1 << 20)
        for slab_id in sorted(self.degraded):
            vs = self.slabs.get(slab_id)
            if vs is None:
                self.degraded.discard(slab_id)
                continue
            state = self._repair.get(slab_id)
            if state is not None and not self.links[vs.replicas[state[0]].link].alive:
                self._repair.pop(slab_id)  # the new target died mid-copy: start over elsewhere
                if state[2] is not None and self.links[state[2].link].alive:
                    vs.replicas[state[0]] = state[2]  # a drain: the old copy is still the real one
                    self._set_replica(slab_id, state[0], state[2], ready=True)
                self.mv_link[0, slab_id] = -1
                state = None
            if state is None:
                # a copy that missed writes while its provider was suspended: copied again in place
                j = next((j for j, rep in enumerate(vs.replicas) if rep is not None and self.links[rep.link].alive
                          and not self.rep_ready[j, slab_id]), None)
                if j is not None and self._source(vs, j, None) is not None:
                    state = self._repair[slab_id] = [j, 0, None, "resync"]
            if state is None:
                j = next((j for j, rep in enumerate(vs.replicas) if self._needs_move(rep, slab_id)), None)
                if j is None:
                    if not self._waiting(vs) and self.rep_ready[:, slab_id].sum() == len(vs.replicas):
                        self.degraded.discard(slab_id)
                    continue
                if self._source(vs, j, vs.replicas[j]) is None:
                    if self._waiting(vs):
                        continue  # the only good copy is on a suspended provider: wait for it
                    log.error("slab %d lost: no live replica left", slab_id)
                    self.counters["slabs_lost"] += 1
                    self.degraded.discard(slab_id)
                    continue
                holders = [self.links[r.link] for r in vs.replicas if r is not None and self.links[r.link].alive]
                taken = {r.link for r in vs.replicas if r is not None}
                cands = [lk for lk in self.live_links() if lk.index not in taken]
                target = None
                for lk in (place(cands, len(cands), holders) if cands else []):
                    try:
                        lease = lk.client.alloc_slab(vs.size)
                    except (errors.CapacityError, errors.ProtocolError) as exc:
                        log.debug("repair target %s refused: %s", lk.name, exc)
                        continue
                    except (errors.ConnectionLost, OSError) as exc:
                        self.suspend(lk.index, f"lease for a repair failed: {exc}")  # don't ask it again
                        continue
                    target = Replica(lk.index, lease.lease_id, lease.region)
                    break
                if target is None:
                    return 0  # stay degraded until a provider has room
                old = vs.replicas[j]
                vs.replicas[j] = target
                self._set_replica(slab_id, j, target, ready=False)
                if old is not None:
                    self.mv_link[0, slab_id] = old.link
                    self.mv_addr[0, slab_id] = old.region.addr
                    self.mv_rkey[0, slab_id] = old.region.rkey
                state = self._repair[slab_id] = [j, 0, old, "copy"]
            j, off, old, kind = state
            src = self._source(vs, j, old)
            if src is None:
                if self._waiting(vs):
                    self._repair.pop(slab_id)
                    continue
                log.error("slab %d lost during repair: no live copy left", slab_id)
                self.counters["slabs_lost"] += 1
                self._repair.pop(slab_id)
                self.degraded.discard(slab_id)
                continue
            n = min(chunk, vs.size - off)
            one = np.ones(1, dtype=np.int64)
            dst = vs.replicas[j]
            if self.run_plans(OP_READ, [(one * src.link, np.array([src.region.addr + off], np.uint64),
                                    np.array([src.region.rkey], np.uint32))],
                         np.array([staging_addr], np.uint64), np.array([n], np.uint32), staging_addr):
                return 0
            if self.run_plans(OP_WRITE, [(one * dst.link, np.array([dst.region.addr + off], np.uint64),
                                     np.array([dst.region.rkey], np.uint32))],
                         np.array([staging_addr], np.uint64), np.array([n], np.uint32), staging_addr):
                return 0
            state[1] = off + n
            moved = old is not None and self.links[old.link].alive
            what = "resynced" if kind == "resync" else "moved" if moved else "rereplicated"
            if state[1] >= vs.size:
                self._repair.pop(slab_id)
                self.rep_ready[j, slab_id] = True
                self.mv_link[0, slab_id] = -1
                self._free_lease(old)
                self.counters[f"slabs_{what}"] += 1
                if old is not None:
                    self.evicting.discard((slab_id, old.link))
                if not any(self._needs_move(rep, slab_id) for rep in vs.replicas) and not self._waiting(vs) \
                        and self.rep_ready[:, slab_id].all():
                    self.degraded.discard(slab_id)
            self.counters[f"bytes_{what}"] += n
            return n
        return 0

    def close(self, timeout: float = 2.0) -> None:
        """Hang up on every provider at once; each one's ``bye`` releases our leases there.

        Links close concurrently and this returns after ``timeout`` at the latest: a hung
        provider gets no ``bye`` and releases our leases after its lease_grace instead.
        """
        self.slabs.clear()
        threads = [threading.Thread(target=self._close_link, args=(link,), name=f"rram-close-{link.name}",
                                    daemon=True) for link in self.links]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _close_link(link: Link) -> None:
        try:
            link.endpoint.close()
        finally:
            try:
                link.client.close()
            except (errors.RramError, OSError) as exc:
                log.debug("closing %s: %s", link.name, exc)


def _chunks(ops: np.ndarray, count: int, endpoint: Endpoint) -> list[tuple[int, int]]:
    """``ops[:count]`` cut into runs of about ``endpoint.read_chunk`` bytes (at most
    ``max_outstanding`` runs): one run when the endpoint does not chunk or the ops are fewer."""
    size = endpoint.read_chunk
    if size <= 0 or count < 2:
        return [(0, count)]
    ends = np.cumsum(ops["length"][:count], dtype=np.uint64)
    total = int(ends[-1])
    parts = min(endpoint.max_outstanding, -(-total // size))
    if parts < 2:
        return [(0, count)]
    cuts = np.searchsorted(ends, np.arange(1, parts, dtype=np.uint64) * np.uint64(-(-total // parts)), "right")
    bounds = [0, *(int(c) for c in cuts if 0 < c < count), count]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

