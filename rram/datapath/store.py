"""The requester's page store: the tmem model over a local compressed pool and remote slabs.

Pools are *persistent* (swap-like: a page is never lost while a replica lives; puts fail with
StoreFullError rather than drop anything) or *ephemeral* (page-cache-like: pages may be dropped
under pressure and simply miss).  Keys are (pool, obj, index).  Remote pages of ephemeral pools
live in their own slabs with one copy (``eph_alloc``): a put that finds no room or no live
provider drops the pages (they miss), and when that copy is lost the slab's pages are forgotten
(``_drop_slabs``).

put:  compress (native LZ4, batch) -> slot in the local pool (size-class allocator)
      -> when the local pool is full, *remotify* the coldest local blocks in batches: one-sided
         WRITE to every replica of a remote virtual slab, then repoint the page map.
get:  page map -> zero fill | decompress from the local pool | READ into staging, decompress.

Sealed pages (``seal=True``, the default): every image bound for a provider is sealed between
compression and the WRITE, and opened between the READ and decompression (seal.py); remote
pages are then READ into the seal buffer instead of staging.  Local pages need no seal.

All per-page state lives in compact arrays (page map: 8 bytes a page; local slot owners: 8 bytes
a local page; seal versions: 8 bytes a sealed remote page).

Single requests (the NBD server's one-request turns) have a C path over the same tables:
``requests`` (ext/_reqpath.pyx: a local read or write, or a read of remote pages over a link's C
core, without the GIL; or a code saying the Python path must serve it).  It shares the store's
lock, a StoreLock that C takes too.  Its remote routes are bound again under the lock before
any Python operation once the tier's route_generation has moved (``_check_open``), and links
C saw fail are suspended there, as the Python fast path suspends them.

Two paths carry a batch's I/O, and one method each decides which runs: ``_get_locs`` for a
get, ``_remote_io`` for the remote WRITEs of a put or remotify (and repatriation's READs).
The fast path (fastpath.py: a few C calls) completes the common case or says it cannot; the
failover path (failover.py: vectorised numpy) then does the whole batch, for dead links, drains
and repairs in progress and links failing mid-batch.  ``fast_path = False`` sends everything
to the failover path (the tests run both); the ``fast_*``/``failover_*`` counters say which ran.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .. import errors
from .._ext._storepath import StorePath, pack_keys

try:  # the C request path needs the native codec (liblz4); without it every request takes Python
    from .._ext._reqpath import FAILURES, RETIRED_CAPACITY, RequestPath, StoreLock
except ImportError:  # pragma: no cover - a build without liblz4
    RequestPath, StoreLock, RETIRED_CAPACITY, FAILURES = None, threading.RLock, 0, {}
from ..memory import Arena
from ..transport.base import WC_STATUS_NAMES
from ..units import PAGE_SIZE
from . import codec
from . import keys as K
from . import slab as L
from .failover import Failover
from .fastpath import FastPath
from .pagemap import PageMap
from .remote import RemoteTier
from .seal import TAG, PageSeal, PlannedOpen

log = logging.getLogger(__name__)

LOCAL_SLAB_MAX = 64 << 20
_COUNTERS = (
    "puts", "succ_puts", "failed_puts", "gets", "succ_gets", "failed_gets",
    "local_gets", "remote_gets", "zero_pages_put", "invalidates", "pages_remoted",
    "remotify_batches", "pages_repatriated", "ephemeral_dropped", "ephemeral_lost", "bytes_in", "bytes_stored_in",
    # which path ran, in batches
    "fast_gets", "failover_gets", "fast_remote_writes", "failover_remote_writes",
    "fast_remote_reads", "failover_remote_reads",
    # reads retried while their only live copies were on suspended providers, in 50 ms steps
    "suspension_waits",
)
#: how often a read waiting for a suspended provider looks again
SUSPENSION_POLL = 0.05


class PageStore:
    """Pools of 4 KiB pages kept compressed locally and in providers' RAM. Thread-safe."""

    def __init__(
        self,
        remote: RemoteTier | None,
        *,
        local_budget: int = 64 << 20,
        batch: int = 256,
        choose_targets=None,
        seal: bool = True,
        requester: str = "",
    ):
        if local_budget < L.BLOCK_SIZE:
            raise errors.ConfigError(f"local_budget must be at least {L.BLOCK_SIZE} bytes, got {local_budget}")
        self._lock = StoreLock()  # re-entrant; the C request path takes it too
        self.batch = max(16, int(batch))
        self.map = PageMap()
        # local pool: one registered arena cut into slabs of the local allocator (ids 1..n)
        local_slab = min(LOCAL_SLAB_MAX, local_budget - local_budget % L.BLOCK_SIZE)
        n_local = max(1, local_budget // local_slab)
        if remote is not None and n_local >= remote.first_slab_id:
            raise errors.ConfigError(f"local_budget {local_budget} needs more than {remote.first_slab_id - 1} local slabs")
        self.local_arena = Arena(local_slab * n_local)
        self.local = L.SlotAllocator(track_owners=True)
        self.local_base = np.zeros(n_local + 1, dtype=np.uint64)
        for i in range(n_local):
            self.local.add_slab(i + 1, local_slab)
            self.local_base[i + 1] = self.local_arena.addr + i * local_slab
        self.last_local_slab = n_local
        # staging: compressed images of a batch (compress output, remote READ target)
        self.staging = Arena(self.batch * PAGE_SIZE)
        self.remote = remote
        #: seals what providers store (None: pages go out as plain images); see seal.py
        self.seal = PageSeal(self.batch, requester) if seal and remote is not None else None
        # a sealed page's version is its remote slot's owner word (8 bytes a remote page)
        sealed = self.seal is not None
        self.remote_alloc = L.SlotAllocator(track_owners=sealed)  # slabs with r copies (persistent pools)
        self.eph_alloc = L.SlotAllocator(track_owners=sealed)  # slabs with one copy (ephemeral pools)
        self._choose = choose_targets or _round_robin
        if remote is not None:
            for link in remote.links:
                self._register_arenas(link)
        self._pools: dict[int, bool] = {}  # pool id -> persistent
        self._eph_pool = np.zeros(K.MAX_POOLS, dtype=bool)  # pool id -> ephemeral, for a key's top byte
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.closed = False
        self.keeper = None  # rram.control.keeper.Keeper, when the store runs one
        # scratch arrays, reused by every batch
        b = self.batch
        self._sizes = np.zeros(b, dtype=np.uint32)
        self._locs = np.zeros(b, dtype=np.uint64)
        self._old = np.zeros(b, dtype=np.uint64)
        self._staging_addrs = self.staging.addr + np.arange(b, dtype=np.uint64) * PAGE_SIZE
        # remote pages are READ into the seal buffer when sealing (room for an image and its tag)
        self._read_base = self.seal.base if self.seal is not None else self.staging.addr
        self._read_addrs = self.seal.addrs if self.seal is not None else self._staging_addrs
        self._ok = np.zeros(b, dtype=np.uint8)
        self._zero_locs = np.full(b, L.ZERO_LOCATION, dtype=np.uint64)
        self._freed = np.zeros(b, dtype=np.uint64)
        self._path = StorePath(self.local_base, n_local, self.staging.addr, b, self._read_base,
                               int(self._read_addrs[1] - self._read_addrs[0]) if b > 1 else PAGE_SIZE)
        self._unswept = False  # remote slots were freed without looking for slabs left empty
        self._one_page = bytearray(PAGE_SIZE)
        self.fast_path = True  # False: every batch takes the failover path (tests, diagnosis)
        opener = self._open_remote if self.seal is not None else None
        # the fast path opens a batch's sealed pages link by link, as their READs land
        planned = (PlannedOpen(self.seal, self.remote_alloc, self.eph_alloc, self._owners, self._reread,
                               self._log_seal_failures) if self.seal is not None else None)
        self._fast = FastPath(remote, self._path, self.local_base, self._read_base,
                              planned.start if planned is not None else None,
                              self._open_remote_one if self.seal is not None else None)
        self._failover = Failover(remote, self._local_addrs, self._read_base, self._read_addrs, opener)
        #: single-page reads and writes in C on these tables (None: not built)
        self.requests = (RequestPath(self._lock, self.map, self.local, self.local_base, n_local)
                         if RequestPath is not None else None)
        self._retired = np.zeros(RETIRED_CAPACITY, dtype=np.uint64)
        self._req_generation = -1  # the tier's route_generation the C path is bound to
        if self.requests is not None and remote is not None:
            remote.route_listeners.append(self.requests.unbind_remote)

    def add_provider(self, link) -> None:
        """A provider that joined (or came back): usable for new slabs and repairs at once."""
        with self._lock:
            self.remote.add_link(link)
            self._register_arenas(link)

    def _register_arenas(self, link) -> None:
        for arena in (self.local_arena, self.staging) + ((self.seal.buf,) if self.seal is not None else ()):
            link.lkeys[arena.addr] = link.endpoint.register_local(arena.addr, arena.length)
        self.remote.invalidate_routes()

    # -- pools -----------------------------------------------------------------------------

    def create_pool(self, persistent: bool = True) -> int:
        with self._lock:
            for pool in range(K.MAX_POOLS):
                if pool not in self._pools:
                    self._pools[pool] = persistent
                    self._eph_pool[pool] = not persistent
                    if self.requests is not None:
                        self.requests.set_pool(pool, True)
                    return pool
        raise errors.RramError(f"all {K.MAX_POOLS} pools are in use")

    def _persistent(self, pool: int) -> bool:
        try:
            return self._pools[pool]
        except KeyError:
            raise errors.NotFound(f"pool {pool} does not exist (create_pool first)") from None

    # -- put ------------------------------------------------------------------------------

    def put(self, pool: int, obj: int, index: int, page) -> None:
        self.put_many(pool, obj, [index], page)

    def put_many(self, pool: int, obj: int, indexes, pages) -> None:
        """Store len(indexes) pages (one buffer of n*4096 bytes) under (pool, obj, index)."""
        keys = _pack(pool, obj, indexes)
        n = len(keys)
        src = _page_bytes(pages, n, "pages")
        # a put that must go remote while every replica of its slots is suspended waits, as a
        # read does, and starts again: each attempt stores every page (again), so a page already
        # committed by a failed attempt is simply replaced by the same bytes
        self._retry_while_suspended(self._put_many, pool, keys, src, n)

    def _put_many(self, pool: int, keys: np.ndarray, src: np.ndarray, n: int) -> None:
        with self._lock:
            self._check_open()
            persistent = self._persistent(pool)
            if n <= self.batch:
                return self._put_batch(keys, src, persistent)
            for start in range(0, n, self.batch):
                end = min(n, start + self.batch)
                self._put_batch(keys[start:end], src[start * PAGE_SIZE : end * PAGE_SIZE], persistent)

    def _put_batch(self, keys: np.ndarray, src: np.ndarray, persistent: bool) -> None:
        n = len(keys)
        self.counters["puts"] += n
        sizes = self._sizes[:n]
        stored = codec.compress_pages(src, n, self.staging.array, sizes)
        path = self._path
        m = path.split_put(sizes, keys, n)
        if m < n:
            self._commit(path.zero_keys[: n - m], self._zero_locs[: n - m])
        if m:
            try:
                self._place(path.nz_keys[:m], path.nz_sizes[:m], path.nz_srcs[:m], persistent)
            except errors.StoreFullError:
                self.counters["failed_puts"] += n
                raise
        self.counters["succ_puts"] += n
        self.counters["zero_pages_put"] += n - m
        self.counters["bytes_in"] += n * PAGE_SIZE
        self.counters["bytes_stored_in"] += stored

    def _commit(self, keys: np.ndarray, locs: np.ndarray) -> None:
        """Point ``keys`` at ``locs`` (their pages are in place) and free what they replaced."""
        n = len(keys)
        old = self._old[:n] if n <= self.batch else np.zeros(n, dtype=np.uint64)
        self.map.store(keys, locs, old)
        self._free(old)

    def _place(self, keys, sizes, srcs, persistent) -> None:
        """Store the compressed images at ``srcs`` in local slots, committing as they land.

        ``keys``, ``sizes`` and ``srcs`` may be the put's scratch arrays: nothing below
        (remotify included) writes to them.

        When the local pool is full, remotify cold pages once (at least an eighth of the pool,
        so that it happens rarely and in large batches) and go on; what still does not fit
        (a tiny budget) is written straight to remote slabs.  Pages are committed to the page
        map before any remotify so that it only ever moves committed pages.
        """
        m = len(keys)
        locs = np.zeros(m, dtype=np.uint64)  # the local allocator records `keys` as slot owners
        done = 0
        remotified = False
        while done < m:
            got = self.local.alloc(sizes[done:], locs[done:], keys[done:], m - done)
            if got:
                part = slice(done, done + got)
                self._path.copy_local(locs[part], srcs[part], sizes[part], got)  # addresses and copies
                self._commit(keys[part], locs[part])
                done += got
            if done == m or remotified or self.remote is None:
                break
            remotified = True
            if not self._remotify(max(int(sizes[done:].sum()), self.local.capacity_bytes // 8)):
                break
        if done < m:
            rest = slice(done, m)
            if not persistent:
                return self._put_ephemeral_remote(
                    keys[rest], *self._alloc_remote(keys[rest], srcs[rest], sizes[rest], self.staging.addr, False))
            rlocs = self._write_remote(keys[rest], srcs[rest], sizes[rest], self.staging.addr)
            if rlocs is None:
                raise errors.StoreFullError(
                    f"local pool ({self.local.capacity_bytes} bytes) and every provider are full"
                )
            self._commit(keys[rest], rlocs)
            self.counters["pages_remoted"] += m - done

    def _put_ephemeral_remote(self, keys, rlocs, srcs, base: int) -> None:
        """Ephemeral pages straight to one-copy slabs; those with no room or no live copy are
        dropped (a put to an ephemeral pool may fail silently): their keys then miss, never
        read an older version."""
        written = np.zeros(len(keys), dtype=bool) if rlocs is None else \
            self._write_ephemeral(rlocs, srcs, base)
        if written.any():
            self._commit(np.ascontiguousarray(keys[written]), np.ascontiguousarray(rlocs[written]))
            self.counters["pages_remoted"] += int(written.sum())
        if not written.all():
            lost = np.ascontiguousarray(keys[~written])
            old = np.zeros(len(lost), dtype=np.uint64)
            self.map.remove(lost, old)
            self._free(old)
            self.counters["ephemeral_dropped"] += len(lost)

    def _write_ephemeral(self, rlocs: np.ndarray, addrs: np.ndarray, base: int) -> np.ndarray:
        """WRITE ephemeral pages to their one copy; the mask of those that landed.  The slots
        of the others are freed, and a slab whose provider failed during the write is dropped:
        the write may have half landed there, and it has no other copy to resync from."""
        before = self.remote.held(rlocs)
        try:
            self._remote_io(True, rlocs, addrs, base, 1)
            return before
        except errors.TransportError:
            after = self.remote.held(rlocs)
            if after.all():  # not a lost provider: an error completion is a bug, not a miss
                raise
        self.remote.drop(np.unique(L.loc_slab(rlocs[before & ~after])).tolist(), "ephemeral_lost")
        landed = after & ~np.isin(L.loc_slab(rlocs), list(self.remote.dropped))
        lost = np.ascontiguousarray(rlocs[~landed])
        self.eph_alloc.free(lost, len(lost))
        self._unswept = True
        self._drop_slabs()
        return landed

    def _local_addrs(self, locs: np.ndarray) -> np.ndarray:
        """Addresses of local slots (a new array)."""
        out = np.empty(len(locs), dtype=np.uint64)
        self._path.local_addrs(locs, len(locs), out)
        return out

    def _free(self, locs: np.ndarray) -> None:
        """Free the slots of the stored locations among ``locs`` (uint64), local or remote."""
        n = len(locs)
        out = self._freed if n <= len(self._freed) else np.empty(n, dtype=np.uint64)
        n_local, n_remote = self._path.split_free(locs, n, out)
        if n_local:
            self.local.free(out, n_local)
        if n_remote:
            freed = out[n_local : n_local + n_remote]
            self._free_remote(freed)
            if n_remote > 8 or self._unswept:
                self._release_empty_slabs()
            else:  # a few pages: only their slabs can have emptied (a full sweep costs O(slabs))
                for slab_id in {(loc >> L.SLAB_SHIFT) & L.SLAB_FIELD for loc in freed.tolist()}:
                    alloc = self._alloc_of(slab_id)
                    if alloc.slab_used_bytes(slab_id) == 0:
                        alloc.remove_slab(slab_id)
                        self.remote.release_slab(slab_id)

    def _alloc_of(self, slab_id: int):
        """The allocator a remote slab belongs to: one copy (ephemeral pools) or r copies."""
        return self.eph_alloc if self.remote.one_copy[0, slab_id] else self.remote_alloc

    def _free_remote(self, rlocs: np.ndarray) -> None:
        """Free remote slots, each in the allocator of its slab."""
        one = self.remote.one_copy[0, L.loc_slab(rlocs).astype(np.intp)]
        if not one.any():
            self.remote_alloc.free(rlocs, len(rlocs))
            return
        for alloc, sel in ((self.eph_alloc, one), (self.remote_alloc, ~one)):
            part = np.ascontiguousarray(rlocs[sel])
            if len(part):
                alloc.free(part, len(part))

    # -- remotify -------------------------------------------------------------------------

    def _alloc_remote(self, keys, srcs, sizes, base: int, persistent: bool):
        """New remote slots for the images at ``srcs`` (in the arena at ``base``), sealed into the
        seal's buffer first when sealing: (their locations, or None when no provider has room;
        the addresses of the images to write; the arena they are in)."""
        if self.seal is None:
            return self._remote_alloc(sizes, persistent), srcs, base
        versions = self.seal.versions(len(keys))
        rlocs = self._remote_alloc(sizes + np.uint32(TAG), persistent, versions)
        if rlocs is None:
            return None, srcs, base
        return rlocs, self.seal.seal(keys, srcs, sizes, versions), self.seal.base

    def _write_remote(self, keys, srcs, sizes, base: int) -> np.ndarray | None:
        """Persistent images to new remote slots, written to every replica (sealed first when
        sealing): their locations, or None when no provider has room.  ReplicationError (too few
        copies) and TransportError (no live replica took some page; ReplicaSuspended if they
        are suspended) free the slots and propagate."""
        rlocs, srcs, base = self._alloc_remote(keys, srcs, sizes, base, True)
        if rlocs is None:
            return None
        try:
            self._remote_io(True, rlocs, srcs, base, self._min_copies(True))
        except (errors.ReplicationError, errors.TransportError):
            self.remote_alloc.free(rlocs, len(rlocs))
            self._unswept = True
            raise
        return rlocs

    def _owners(self, rlocs: np.ndarray) -> np.ndarray:
        """The owner words (seal versions) of remote slots, each from the allocator of its slab."""
        out = np.empty(len(rlocs), dtype=np.uint64)
        one = self.remote.one_copy[0, L.loc_slab(rlocs).astype(np.intp)]
        for alloc, sel in ((self.eph_alloc, one), (self.remote_alloc, ~one)):
            if sel.all():
                alloc.owners(rlocs, out)
                return out
            if sel.any():
                part = np.empty(int(sel.sum()), dtype=np.uint64)
                alloc.owners(np.ascontiguousarray(rlocs[sel]), part)
                out[sel] = part
        return out

    def _open_remote(self, rlocs: np.ndarray, keys: np.ndarray, addrs: np.ndarray) -> None:
        """Open sealed remote pages READ to ``addrs`` in place, re-reading any that fail from their
        other copies (SealError when none opens).  The fast and failover paths both call this."""
        versions = self._owners(rlocs)
        failures = self.seal.failures
        try:
            self.seal.open(rlocs, keys, addrs, versions, self._reread)
        finally:
            self._log_seal_failures(failures)

    def _open_remote_one(self, loc: int, key: int, addr: int) -> None:
        """``_open_remote`` for one page (the latency path: scalars)."""
        failures = self.seal.failures
        try:
            self.seal.open_one(loc, key, addr, self._alloc_of(L.loc_slab(loc)).owner_of(loc), self._reread)
        finally:
            self._log_seal_failures(failures)

    def _reread(self, locs, addrs, copy, want):
        return self._failover.read_copy(locs, addrs, self._read_base, copy, want)

    def _log_seal_failures(self, before: int) -> None:
        if self.seal.failures != before:  # a provider (or its memory) is not to be trusted: say so
            log.warning("%d sealed page copies failed their tag (%d in all)", self.seal.failures - before,
                        self.seal.failures)

    def _remote_alloc(self, sizes: np.ndarray, persistent: bool, owners: np.ndarray | None = None) -> np.ndarray | None:
        """Remote locations for ``sizes`` (with ``owners``: the seal versions), leasing new slabs as
        needed; None when out of room."""
        m = len(sizes)
        out = np.zeros(m, dtype=np.uint64)
        alloc = self.remote_alloc if persistent else self.eph_alloc
        done = 0
        while done < m:
            done += alloc.alloc(sizes[done:], out[done:], None if owners is None else owners[done:], m - done)
            if done == m:
                break
            try:
                vs = self.remote.lease_slab(self._choose, self._min_copies(persistent), ephemeral=not persistent)
            except (errors.StoreFullError, errors.CapacityError) as exc:
                log.info("cannot lease a remote slab: %s", exc)
                if done:
                    alloc.free(out[:done], done)
                    self._unswept = True
                if isinstance(exc, errors.ReplicationError):
                    raise
                return None
            alloc.add_slab(vs.slab_id, vs.size)
        return out

    def _min_copies(self, persistent: bool) -> int:
        """Live copies a remote write of this kind needs: ephemeral pages may always have one."""
        return self.remote.min_replicas if persistent else 1

    def _remotify(self, want_bytes: int) -> bool:
        """Move cold local pages (about ``want_bytes`` of them) to remote slabs: those of persistent
        pools to slabs with r copies, ephemeral ones to one-copy slabs (or dropped when no
        provider takes them).  False when nothing left the local pool."""
        freed = moved = 0
        while freed < want_bytes:
            locs, owners = self._victims(self.batch)
            if len(locs) == 0:
                break
            eph = self._eph_pool[(owners >> np.uint64(56)).astype(np.intp)]
            full = False
            before = moved
            for persistent, sel in ((True, ~eph), (False, eph)):
                if sel.any():
                    got = self._move_out(np.ascontiguousarray(locs[sel]), np.ascontiguousarray(owners[sel]), persistent)
                    if got is None:  # no remote room for persistent pages: they stay local
                        full = True
                    else:
                        moved += got[0]
                        freed += got[1]
            if full or moved == before:
                break
            self.counters["remotify_batches"] += 1
        return moved > 0

    def _move_out(self, locs: np.ndarray, owners: np.ndarray, persistent: bool) -> tuple[int, int] | None:
        """Move the local pages at ``locs`` (owned by ``owners``, all of one kind) to remote slabs;
        (pages that left the local pool, bytes freed there), or None when persistent ones cannot
        go (no room, too few copies).  Ephemeral pages that find no room or no live provider are
        dropped: they count as gone."""
        sizes = L.loc_size(locs).astype(np.uint32)
        addrs = self._local_addrs(locs)
        if persistent:
            try:
                rlocs = self._write_remote(owners, addrs, sizes, self.local_arena.addr)
            except errors.ReplicationError as exc:  # too few copies: persistent pages stay local
                log.warning("not moving pages out: %s", exc)
                return None
            if rlocs is None:  # no room: persistent pages stay
                return None
        else:
            rlocs, images, base = self._alloc_remote(owners, addrs, sizes, self.local_arena.addr, False)
            if rlocs is None:  # no room: ephemeral pages go
                return self._drop_local(locs, owners)
        gone = freed = 0
        if not persistent:
            landed = self._write_ephemeral(rlocs, images, base)
            if not landed.all():  # no live provider for these (their remote slots are freed): dropped
                gone, freed = self._drop_local(np.ascontiguousarray(locs[~landed]),
                                               np.ascontiguousarray(owners[~landed]))
                locs, owners, rlocs, sizes = (np.ascontiguousarray(a[landed]) for a in (locs, owners, rlocs, sizes))
        ok = np.empty(len(locs), dtype=np.uint8)
        self.map.cas(owners, locs, rlocs, ok)
        moved_mask = ok.astype(bool)
        self.local.free(np.ascontiguousarray(locs[moved_mask]), int(moved_mask.sum()))
        if not moved_mask.all():  # overwritten meanwhile: the new copy stays local
            stale = np.ascontiguousarray(rlocs[~moved_mask])
            self._free_remote(stale)
            self._unswept = True
        n = int(moved_mask.sum())
        self.counters["pages_remoted"] += n
        return n + gone, int(sizes[moved_mask].sum()) + freed

    def _victims(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` distinct cold local slots (the clock may hand them out a block at a time)."""
        locs = np.empty(k, dtype=np.uint64)  # not the batch scratch: a put may be using it
        owners = np.empty(k, dtype=np.uint64)
        total = 0
        for _ in range(64):
            got = self.local.pick_victims(k - total, locs[total:], owners[total:])
            total += got
            if got == 0 or total == k:
                break
        locs, first = np.unique(locs[:total], return_index=True)  # a full lap may come round again
        return locs, owners[:total][first]

    def _drop_local(self, locs: np.ndarray, owners: np.ndarray) -> tuple[int, int]:
        """Drop the ephemeral pages at local ``locs`` (their keys miss from now on); (pages, bytes) freed."""
        zeros = np.zeros(len(locs), dtype=np.uint64)
        ok = np.zeros(len(locs), dtype=np.uint8)
        self.map.cas(owners, locs, zeros, ok)
        dropped = np.ascontiguousarray(locs[ok.astype(bool)])
        self.local.free(dropped, len(dropped))
        self.counters["ephemeral_dropped"] += len(dropped)
        return len(dropped), int(L.loc_size(dropped).sum())

    def _release_empty_slabs(self) -> None:
        self._unswept = False
        for alloc in (self.remote_alloc, self.eph_alloc):
            for slab_id in alloc.empty_slabs():
                alloc.remove_slab(slab_id)
                self.remote.release_slab(slab_id)

    def _drop_slabs(self) -> None:
        """Forget the pages of the ephemeral slabs the remote tier dropped (their one copy died or
        may hold a half-landed write, or its provider leaves or wants memory back), and release
        the slabs: those pages miss from now on."""
        remote = self.remote
        if remote is None or not remote.dropped:
            return
        if self.requests is not None and self.requests.nretired:  # C writes replaced some of their pages
            n = self.requests.take_retired(self._retired)
            self._free(self._retired[:n])
        while remote.dropped:
            slab_id, counter = remote.dropped.popitem()
            keys, locs = self.map.select(L.SLAB_MASK, np.uint64(slab_id) << np.uint64(L.SLAB_SHIFT), 0)
            if len(keys):
                self.map.remove(keys, np.zeros(len(keys), dtype=np.uint64))
                self.eph_alloc.free(locs, len(locs))
            self.counters[counter] += len(keys)
            if self.eph_alloc.slab_used_bytes(slab_id) == 0:
                self.eph_alloc.remove_slab(slab_id)
                remote.release_slab(slab_id)
            else:  # a slot no page owns: a leak to fix, but never place in the slab again
                log.error("ephemeral slab %d still has %d bytes allocated after its pages were dropped",
                          slab_id, self.eph_alloc.slab_used_bytes(slab_id))
                self.eph_alloc.retire_slab(slab_id)

    # -- get ------------------------------------------------------------------------------

    def get(self, pool: int, obj: int, index: int, out=None) -> bytes | None:
        """One page, or None on a miss (the latency path: one page, one remote op at most).

        A miss leaves ``out`` as it was, but for an ephemeral page whose provider is out of
        reach (zero-filled).

        With ``out`` (a writable 4096-byte buffer) the page is decompressed into it and
        ``out`` is returned; without, a new bytes object.
        """
        return self._retry_while_suspended(self._get_one, pool, obj, index, out)

    def _get_one(self, pool: int, obj: int, index: int, out) -> bytes | None:
        key = K.pack(pool, obj, index)
        if self.requests is not None:  # the C request path first: no Python between lookup and page
            dst = bytearray(PAGE_SIZE) if out is None else out  # not _one_page: C runs without our lock
            try:
                rc = self.requests.get(key, dst)
            except (TypeError, ValueError):  # not a buffer of 4096 bytes C takes: Python's path says
                rc = None
            if rc == 0:  # REQ_DONE; anything else changed nothing: a miss, or a case Python serves
                return bytes(dst) if out is None else out
        dst = self._one_page if out is None else out
        with self._lock:
            self._check_open()
            self._persistent(pool)
            loc = self.map.get(key)
            if loc == L.ABSENT:  # a miss leaves ``out`` as it was
                self.counters["gets"] += 1
                self.counters["failed_gets"] += 1
                return None
            found = self._get_locs(loc, dst, key)
            if found is not True and not found[0]:  # an ephemeral page whose one copy is out of reach
                return None
            return bytes(dst) if out is None else out

    def get_many(self, pool: int, obj: int, indexes, out) -> np.ndarray:
        """Read pages into ``out`` (n*4096 writable bytes); returns the found mask.

        Missing pages are zero-filled.
        """
        return self._retry_while_suspended(self._get_many, pool, obj, indexes, out)

    def _get_many(self, pool: int, obj: int, indexes, out) -> np.ndarray:
        keys = _pack(pool, obj, indexes)
        n = len(keys)
        dst = _page_bytes(out, n, "output")
        with self._lock:
            self._check_open()
            self._persistent(pool)
            if n <= self.batch:
                return self._get_batch(keys, dst)
            found = np.zeros(n, dtype=bool)
            for start in range(0, n, self.batch):
                end = min(n, start + self.batch)
                found[start:end] = self._get_batch(keys[start:end], dst[start * PAGE_SIZE : end * PAGE_SIZE])
        return found

    def _completion_spin(self) -> dict:
        """How the live links' C cores waited for completions (polled and caught, polled in
        vain, slept), summed over the links; a link that died takes its counts with it."""
        total: dict = {}
        for lk in self.remote.links:
            core = lk.endpoint.c_core() if lk.alive else None
            if core is not None:
                for k, v in core.spin_counters().items():
                    total[k] = total.get(k, 0) + v
        return total

    def _retry_while_suspended(self, op, *args):
        """``op(*args)``, again while it fails only because the pages' live copies sit on
        suspended providers, for up to ``remote.suspension_wait`` seconds (the store lock is not
        held while waiting: the keeper needs it to resume or bury the provider).  Reads and
        puts are idempotent, so a retry from the start is safe."""
        deadline = None
        while True:
            try:
                return op(*args)
            except errors.ReplicaSuspended:
                now = time.monotonic()
                deadline = deadline or now + self.remote.suspension_wait
                if now >= deadline:
                    raise
                self.counters["suspension_waits"] += 1
                time.sleep(SUSPENSION_POLL)

    def _get_batch(self, keys: np.ndarray, dst: np.ndarray) -> np.ndarray:
        locs = self._locs[: len(keys)]
        self.map.lookup(keys, locs)
        return self._get_locs(locs, dst, keys)

    # -- the dispatch points: fast path, else failover ------------------------------------

    def _get_locs(self, locs: np.ndarray | int, dst, keys):
        """Decompress the pages at looked-up ``locs`` of ``keys`` (one batch at most; ints: get()'s
        one page) into ``dst``; the found mask."""
        got = self._fast.get(locs, dst, keys) if self.fast_path else None
        c = self.counters
        if got is None:
            got = self._failover.get(locs, dst, keys)
            c["failover_gets"] += 1
        else:
            c["fast_gets"] += 1
        found, hits, nlocal, nremote = got
        n = 1 if isinstance(locs, int) else len(locs)
        c["gets"] += n
        c["succ_gets"] += hits
        c["failed_gets"] += n - hits
        c["local_gets"] += nlocal
        c["remote_gets"] += nremote
        return found

    def _remote_io(self, write: bool, rlocs: np.ndarray, addrs: np.ndarray, base: int, min_copies: int = 1) -> None:
        """WRITE the pages at ``addrs`` (in the arena at ``base``) to every replica of ``rlocs``,
        or READ their stored bytes into ``addrs``.  A write needs ``min_copies`` live copies of
        every page before and after (ReplicationError), and leaves the slabs it touched noted as
        stale on suspended providers (copied again when they resume)."""
        fast, failover = (self._fast.write, self._failover.write) if write else (self._fast.read, self._failover.read)
        what = "remote_writes" if write else "remote_reads"
        if write:
            self.remote.require_copies(rlocs, min_copies, "before")
        if self.fast_path and fast(rlocs, addrs, base):
            self.counters["fast_" + what] += 1
        else:
            self.counters["failover_" + what] += 1
            failover(rlocs, addrs, base)
        if write:
            self.remote.require_copies(rlocs, min_copies, "after")
            self.remote.note_missed(rlocs)

    # -- invalidate -----------------------------------------------------------------------

    def invalidate_page(self, pool: int, obj: int, index: int) -> bool:
        return self.invalidate_pages(pool, obj, [index]) == 1

    def invalidate_pages(self, pool: int, obj: int, indexes) -> int:
        keys = K.pack_many(pool, obj, indexes)
        with self._lock:
            self._check_open()
            self._persistent(pool)
            old = np.zeros(len(keys), dtype=np.uint64)
            removed = self.map.remove(keys, old)
            self._free(old)
            self.counters["invalidates"] += removed
            return removed

    def invalidate_object(self, pool: int, obj: int) -> int:
        K.check(pool, obj)
        lo = K.pack(pool, obj, 0)
        with self._lock:
            self._check_open()
            _, locs = self.map.remove_range(lo, lo + K.MAX_INDEX)
            self._free(locs)
            self.counters["invalidates"] += len(locs)
            return len(locs)

    def invalidate_pool(self, pool: int) -> int:
        """Drop every page of ``pool`` and the pool itself (tmem's flush_pool)."""
        with self._lock:
            self._check_open()
            self._persistent(pool)
            lo = pool << 56
            _, locs = self.map.remove_range(lo, lo + (1 << 56))
            self._free(locs)
            del self._pools[pool]
            self._eph_pool[pool] = False
            if self.requests is not None:
                self.requests.set_pool(pool, False)
            self.counters["invalidates"] += len(locs)
            return len(locs)

    def flush(self) -> None:
        """Return once every acknowledged put is durable.

        Puts are synchronous (remote writes complete at every replica before a put returns),
        so this only waits for a put or remotify running in another thread.
        """
        with self._lock:
            self._check_open()

    # -- repatriation ---------------------------------------------------------------------

    def repatriate(self, max_pages: int) -> int:
        """Bring up to ``max_pages`` remote pages home into free local slots (selfshrinking)."""
        moved = 0
        with self._lock:
            self._check_open()
            if self.remote is None:
                return 0
            for slab_id in list(self.remote.slabs):
                one_copy = bool(self.remote.one_copy[0, slab_id])
                while moved < max_pages:
                    k = min(self.batch, max_pages - moved)
                    keys, locs = self.map.select(L.SLAB_MASK, np.uint64(slab_id) << np.uint64(L.SLAB_SHIFT), k)
                    if len(keys) == 0:
                        break
                    sizes = L.loc_size(locs).astype(np.uint32)  # sealed sizes until opened
                    if self.local.free_bytes < int(sizes.sum()) + 8 * L.BLOCK_SIZE:
                        return moved
                    n = len(keys)
                    stage = self._read_addrs[:n]
                    if one_copy and not self.remote.held(locs[:1])[0]:
                        break  # an ephemeral slab whose provider is out: its pages miss, nothing to bring
                    try:
                        self._remote_io(False, locs, stage, self._read_base)
                    except errors.TransportError:
                        if not one_copy:
                            raise
                        break  # its provider failed meanwhile (the keeper sees to it)
                    if self.seal is not None:  # opened in place: the local slot holds the plain image
                        self._open_remote(locs, keys, stage)
                        sizes -= np.uint32(TAG)
                    llocs = np.zeros(n, dtype=np.uint64)
                    got = self.local.alloc(sizes, llocs, keys, n)
                    if got < n:
                        self.local.free(llocs[:got], got)
                        return moved
                    self._path.copy_local(llocs, stage, sizes, n)
                    ok = self._ok[:n]
                    self.map.cas(keys, locs, llocs, ok)
                    okb = ok.astype(bool)
                    self.local.free(np.ascontiguousarray(llocs[~okb]), int((~okb).sum()))
                    self._free_remote(np.ascontiguousarray(locs[okb]))
                    self._unswept = True
                    moved += int(okb.sum())
                    self.counters["pages_repatriated"] += int(okb.sum())
                if moved >= max_pages:
                    break
            self._release_empty_slabs()
        return moved

    # -- repair and drain -----------------------------------------------------------------

    def repair(self, max_seconds: float = 0.05) -> int:
        """Re-replicate degraded slabs and move slabs off draining providers for a while.

        Takes the lock one chunk at a time so puts and gets go on in between.  Returns the
        bytes copied; 0 when nothing needed doing (or no provider can take a copy yet).
        """
        if self.remote is None:
            return 0
        done = 0
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            with self._lock:
                self._check_open()
                self._drop_slabs()
                n = self.remote.repair_step(self._choose, self.staging.addr, self.staging.length)
                if n == 0:
                    self._release_empty_slabs()
                    break
            done += n
        return done

    def set_placement(self, place) -> None:
        """``place(candidates, n, chosen) -> links``: the policy for new slabs and repairs."""
        self._choose = place

    def slab_bytes(self) -> int:
        return self.remote.slab_size if self.remote is not None else 0

    def provider_failed(self, index: int, why: str) -> None:
        """Stop using provider link ``index`` at once (its slabs become degraded)."""
        with self._lock:
            self.remote.mark_dead(index, why)
            self._drop_slabs()  # its ephemeral slabs: their pages miss from now on

    def resume_provider(self, index: int) -> int:
        """A suspended provider is back with its leases; returns its copies to bring up to date."""
        with self._lock:
            stale = self.remote.resume(index)
            self._register_arenas(self.remote.links[index])  # suspend deregistered them
            self._drop_slabs()
            return stale


    def wants_repatriation(self) -> bool:
        """True while remote pages exist and over half of the local pool is free."""
        with self._lock:  # the C request path changes the local pool without the GIL
            return (self.remote is not None and (self.remote_alloc.stats()["slots_used"] > 0
                                                 or self.eph_alloc.stats()["slots_used"] > 0)
                    and self.local.free_bytes > self.local.capacity_bytes // 2)

    def reclaim(self, index: int, nbytes: int) -> int:
        """Give ``nbytes`` back to provider link ``index`` (its host needs the memory).

        Its ephemeral slabs go first (tmem: their pages may be dropped; they simply miss
        later) and are released at once; then persistent slabs are moved off it as in a
        drain, the emptiest first.  Bytes already being moved away count.  Returns the bytes
        released or newly scheduled to move.
        """
        with self._lock:
            self._check_open()
            remote = self.remote
            pending = remote.slab_size * sum(1 for _s, li in remote.evicting if li == index)
            want = nbytes - pending
            if want <= 0:
                return 0
            mine = [vs for vs in remote.slabs.values()
                    if any(r is not None and r.link == index for r in vs.replicas)
                    and (vs.slab_id, index) not in remote.evicting]
            mine.sort(key=lambda vs: (not vs.ephemeral, self._alloc_of(vs.slab_id).slab_used_bytes(vs.slab_id)))
            done = 0
            for vs in mine:
                if done >= want:
                    break
                done += remote.slab_size * remote.evict(index, [vs.slab_id])
            self._drop_slabs()
            log.info("giving %d bytes back to provider %s (%d already on their way)", done,
                     remote.links[index].name, pending)
            return done

    def drain(self, provider: str) -> int:
        """Start moving every slab off ``provider``; ``repair()`` does the copying."""
        with self._lock:
            link = next((lk for lk in self.remote.links if lk.name == provider), None) if self.remote else None
            if link is None:
                raise errors.NotFound(f"no provider named {provider!r} in this store")
            n = self.remote.start_drain(link.index)
            self._drop_slabs()  # its ephemeral slabs are not moved: their pages miss from now on
            return n

    # -- stats / lifetime -----------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            if not self.closed:
                self._check_open()  # frees retired remote copies, so the figures are current
            c = dict(self.counters)
            if self.requests is not None:  # what the C request path did, in the same terms
                r = self.requests.counters()
                c["puts"] += r["write_done"]
                c["succ_puts"] += r["write_done"]
                c["zero_pages_put"] += r["zero_writes"]
                c["bytes_in"] += r["bytes_in"]
                c["bytes_stored_in"] += r["bytes_stored"]
                c["gets"] += r["read_done"]
                c["succ_gets"] += r["read_done"] - r["absent_reads"]
                c["failed_gets"] += r["absent_reads"]
                c["local_gets"] += r["read_done"] - r["absent_reads"] - r["zero_reads"] - r["remote_reads"]
                c["remote_gets"] += r["remote_reads"]
                c["c_reads"] = r["read_done"]  # pages
                c["c_remote_reads"] = r["remote_reads"]  # of those, pages read from providers
                c["c_remote_batches"] = r["remote_batches"]
                c["c_writes"] = r["write_done"]
                declined = {k: v for k, v in r.items() if k.startswith(("read_", "write_"))
                            and not k.endswith("_done")}
                c["c_declined"] = sum(declined.values())  # requests, by reason below
                c["c_declined_by"] = declined
            local = self.local.stats()
            remote, eph = self.remote_alloc.stats(), self.eph_alloc.stats()
            c["pages"] = len(self.map)
            c["local_pages"] = int(local["slots_used"])
            c["remote_pages"] = int(remote["slots_used"]) + int(eph["slots_used"])
            c["ephemeral_remote_pages"] = int(eph["slots_used"])  # of remote_pages, in one-copy slabs
            c["local_compressed_bytes"] = int(local["bytes_stored"])
            c["remote_compressed_bytes"] = int(remote["bytes_stored"]) + int(eph["bytes_stored"])
            c["local_budget"] = int(self.local.capacity_bytes)
            c["local_free_bytes"] = int(self.local.free_bytes)
            stored = c["local_compressed_bytes"] + c["remote_compressed_bytes"]
            c["compressed_bytes"] = stored
            c["zero_pages"] = c["pages"] - c["local_pages"] - c["remote_pages"]
            c["compression_ratio"] = round(c["bytes_stored_in"] and c["bytes_in"] / max(1, c["bytes_stored_in"]), 3)
            c["metadata_bytes"] = int(self.map.metadata_bytes()) + int(remote["owner_bytes"])
            c["sealed"] = self.seal is not None
            if self.seal is not None:  # tags that failed (each copy tried counts), pages saved by another copy
                c["seal_failures"] = self.seal.failures
                c["seal_recovered"] = self.seal.recovered
                c["seal_version_bytes"] = int(remote["owner_bytes"])
            if self.remote is not None:
                c["replicas"] = self.remote.replicas
                c["remote_slabs"] = len(self.remote.slabs)
                c["ephemeral_slabs"] = int(sum(vs.ephemeral for vs in self.remote.slabs.values()))
                c["remote_leased_bytes"] = self.remote.leased_bytes()
                c["providers"] = {lk.name: ("suspended" if lk.suspended else "dead" if not lk.alive
                                            else "draining" if lk.draining else "alive")
                                  for lk in self.remote.links}
                c["degraded_slabs"] = len(self.remote.degraded)
                c["completion_spin"] = self._completion_spin()
                c["route_generation"] = self.remote.route_generation
                c.update(self.remote.counters)
            c["codec"] = codec.IMPLEMENTATION
            return c

    def _check_open(self) -> None:
        """Under the lock, before any use of the tables: refuse a closed store, and free the remote
        copies that C writes replaced since Python last held the lock."""
        if self.closed:
            raise errors.RramError("page store is closed")
        req = self.requests
        if req is None:
            return
        if req.nretired:
            n = req.take_retired(self._retired)
            self._free(self._retired[:n])
        if self.remote is not None:
            if req.nfailed:
                self._suspend_c_failures()
            if self._req_generation != self.remote.route_generation:
                self._bind_requests()

    def _bind_requests(self) -> None:
        """Point the C path's remote reads at the tier's current routes (under the lock); with
        sealed pages they READ into the seal buffer and open each image there, as Python does."""
        remote = self.remote
        cores = [lk.endpoint.c_core() if lk.alive else None for lk in remote.links]
        if self.seal is None:
            router, lkeys = remote.router(self.staging.addr)
            self.requests.bind_remote(router, lkeys, cores, self.staging.addr, self.batch, remote.read_timeout)
        else:
            router, lkeys = remote.router(self.seal.base)
            self.requests.bind_remote(router, lkeys, cores, self.seal.base, self.seal.buf.length // PAGE_SIZE,
                                      remote.read_timeout, self.seal.sealer, self.remote_alloc, self.eph_alloc)
        self._req_generation = remote.route_generation

    def _suspend_c_failures(self) -> None:
        """Suspend the links the C path saw fail, as Python's fast path does with its own failures."""
        for li, code, detail in self.requests.take_failures():
            link = self.remote.links[li]
            if not link.alive:
                continue
            if code == FAILURES["timeout"]:
                why = f"no completion in {detail / 1000:g}s (a read in C)"
            elif code == FAILURES["status"]:
                why = f"link failure ({WC_STATUS_NAMES.get(detail, detail)}) on a read in C"
            else:
                why = link.endpoint.c_failure(code, detail)
            self.remote.suspend(li, why)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.requests is not None:
                self.requests.close()
            if self.keeper is not None:
                self.keeper.stop()
            if self.remote is not None:
                self.remote.close()
            self.staging.close()
            self.local_arena.close()
            if self.seal is not None:
                self.seal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _page_bytes(buf, n: int, what: str) -> np.ndarray:
    """``buf`` (any buffer of n pages) as a flat uint8 array, or ValueError naming ``what``."""
    arr = buf.reshape(-1) if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    if arr.nbytes != n * PAGE_SIZE:
        raise ValueError(f"{n} indexes need {n * PAGE_SIZE} bytes of {what}, got {arr.nbytes}")
    return arr


def _pack(pool: int, obj: int, indexes) -> np.ndarray:
    """Page keys: one C call for an integer array, keys.pack_many (and its errors) for the rest."""
    keys = pack_keys(pool, obj, indexes)
    return K.pack_many(pool, obj, indexes) if keys is None else keys


def _round_robin(candidates, n, chosen):
    """Placement without a keeper: the candidates this store placed fewest slabs on, one per failure
    domain, so slabs go round robin.  The keeper installs free-space-aware placement instead."""
    domains = {lk.failure_domain for lk in chosen if lk.failure_domain}
    spread = [lk for lk in candidates if not lk.failure_domain or lk.failure_domain not in domains]
    pool = spread or candidates
    pool = sorted(pool, key=lambda lk: lk.slabs_placed)
    picks = pool[:n]
    for lk in picks:
        lk.slabs_placed += 1
    return picks
