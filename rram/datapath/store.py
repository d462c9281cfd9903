"""The requester's page store: the tmem model over a local compressed pool and remote slabs.

Pools are *persistent* (swap-like: a page is never lost while a replica lives; puts fail with
StoreFullError rather than drop anything) or *ephemeral* (page-cache-like: pages may be dropped
under pressure and simply miss).  Keys are (pool, obj, index).

put:  compress (native LZ4, batch) -> slot in the local pool (size-class allocator)
      -> when the local pool is full, *remotify* the coldest local blocks in batches: one-sided
         WRITE to every replica of a remote virtual slab, then repoint the page map.
get:  page map -> zero fill | decompress from the local pool | READ into staging, decompress.

All per-page state lives in compact arrays (page map: 8 bytes a page; local slot owners: 8 bytes
a local page).  The common case of a batch is a few C calls (rram._ext._storepath plans it:
classification, decompress sources, remote operations, free lists); the vectorised numpy code
remains the slow path for the unusual cases (failed links, drains, degraded slabs).
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .. import errors
from .._ext._storepath import StorePath, pack_keys
from ..memory import Arena
from ..units import PAGE_SIZE
from . import codec
from . import keys as K
from . import slab as L
from .pagemap import PageMap
from .remote import RemoteTier

log = logging.getLogger(__name__)

LOCAL_SLAB_MAX = 64 << 20
_COUNTERS = (
    "puts", "succ_puts", "failed_puts", "gets", "succ_gets", "failed_gets",
    "local_gets", "remote_gets", "zero_pages_put", "invalidates", "pages_remoted",
    "remotify_batches", "pages_repatriated", "ephemeral_dropped", "bytes_in", "bytes_stored_in",
)


class PageStore:
    """Pools of 4 KiB pages kept compressed locally and in providers' RAM. Thread-safe."""

    def __init__(
        self,
        remote: RemoteTier | None,
        *,
        local_budget: int = 64 << 20,
        batch: int = 256,
        choose_targets=None,
        copy_batch=None,
    ):
        if local_budget < L.BLOCK_SIZE:
            raise errors.ConfigError(f"local_budget must be at least {L.BLOCK_SIZE} bytes, got {local_budget}")
        self._lock = threading.RLock()
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
        self.remote_alloc = L.SlotAllocator(track_owners=False)
        self._choose = choose_targets or _most_free_first
        self._copy = copy_batch or _DEFAULT_COPY
        if remote is not None:
            for link in remote.links:
                self._register_arenas(link)
        self._pools: dict[int, bool] = {}  # pool id -> persistent
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.closed = False
        self.keeper = None  # rram.control.keeper.Keeper, when the store runs one
        # scratch arrays, reused by every batch
        b = self.batch
        self._sizes = np.zeros(b, dtype=np.uint32)
        self._locs = np.zeros(b, dtype=np.uint64)
        self._old = np.zeros(b, dtype=np.uint64)
        self._srcs = np.zeros(b, dtype=np.uint64)
        self._staging_addrs = self.staging.addr + np.arange(b, dtype=np.uint64) * PAGE_SIZE
        self._ok = np.zeros(b, dtype=np.uint8)
        self._zero_locs = np.full(b, L.ZERO_LOCATION, dtype=np.uint64)
        self._freed = np.zeros(b, dtype=np.uint64)
        self._path = StorePath(self.local_base, n_local, self.staging.addr, b)  # C batch steps + their scratch
        self._unswept = False  # remote slots were freed without looking for slabs left empty
        self._one_src = np.zeros(1, dtype=np.uint64)
        self._one_size = np.zeros(1, dtype=np.uint32)
        self._one_page = bytearray(PAGE_SIZE)

    def add_provider(self, link) -> None:
        """A provider that joined (or came back): usable for new slabs and repairs at once."""
        with self._lock:
            self.remote.add_link(link)
            self._register_arenas(link)
            self.remote.epoch += 1

    def _register_arenas(self, link) -> None:
        for arena in (self.local_arena, self.staging):
            link.lkeys[arena.addr] = link.endpoint.register_local(arena.addr, arena.length)
        self.remote.invalidate_routes()

    # -- pools -----------------------------------------------------------------------------

    def create_pool(self, persistent: bool = True) -> int:
        with self._lock:
            for pool in range(K.MAX_POOLS):
                if pool not in self._pools:
                    self._pools[pool] = persistent
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
                self._copy_local(locs[part], srcs[part], sizes[part], got)
                self._commit(keys[part], locs[part])
                done += got
            if done == m or remotified or self.remote is None:
                break
            remotified = True
            if not self._remotify(max(int(sizes[done:].sum()), self.local.capacity_bytes // 8)):
                break
        if done < m:
            rest = slice(done, m)
            rlocs = self._remote_alloc(sizes[rest], persistent)
            if rlocs is None:
                raise errors.StoreFullError(
                    f"local pool ({self.local.capacity_bytes} bytes) and every provider are full"
                )
            self.remote.write(rlocs, srcs[rest], self.staging.addr)
            self._commit(keys[rest], rlocs)
            self.counters["pages_remoted"] += m - done

    def _copy_local(self, locs, srcs, sizes, n) -> None:
        if self._copy is _DEFAULT_COPY:
            self._path.copy_local(locs, srcs, sizes, n)  # addresses and copies in one call
        else:
            self._copy(self._local_addrs(locs), srcs, sizes, n)

    def _local_addrs(self, locs: np.ndarray) -> np.ndarray:
        """Addresses of local slots (a new array)."""
        out = np.empty(len(locs), dtype=np.uint64)
        self._path.local_addrs(locs, len(locs), out)
        return out

    def _is_local(self, locs: np.ndarray) -> np.ndarray:
        slab = L.loc_slab(locs)
        return (L.loc_kind(locs) == L.KIND_STORED) & (slab <= self.last_local_slab)

    def _free(self, locs: np.ndarray) -> None:
        """Free the slots of the stored locations among ``locs`` (uint64), local or remote."""
        n = len(locs)
        out = self._freed if n <= len(self._freed) else np.empty(n, dtype=np.uint64)
        n_local, n_remote = self._path.split_free(locs, n, out)
        if n_local:
            self.local.free(out, n_local)
        if n_remote:
            freed = out[n_local : n_local + n_remote]
            self.remote_alloc.free(freed, n_remote)
            if n_remote > 8 or self._unswept:
                self._release_empty_slabs()
            else:  # a few pages: only their slabs can have emptied (a full sweep costs O(slabs))
                for slab_id in {(loc >> L.SLAB_SHIFT) & L.SLAB_FIELD for loc in freed.tolist()}:
                    if self.remote_alloc.slab_used_bytes(slab_id) == 0:
                        self.remote_alloc.remove_slab(slab_id)
                        self.remote.release_slab(slab_id)

    # -- remotify -------------------------------------------------------------------------

    def _remote_alloc(self, sizes: np.ndarray, persistent: bool) -> np.ndarray | None:
        """Remote locations for ``sizes``, leasing new slabs as needed; None when out of room."""
        m = len(sizes)
        out = np.zeros(m, dtype=np.uint64)
        done = 0
        while done < m:
            done += self.remote_alloc.alloc(sizes[done:], out[done:], None, m - done)
            if done == m:
                break
            try:
                vs = self.remote.lease_slab(self._choose)
            except (errors.StoreFullError, errors.CapacityError) as exc:
                log.info("cannot lease a remote slab: %s", exc)
                if done:
                    self.remote_alloc.free(out[:done], done)
                    self._unswept = True
                return None
            self.remote_alloc.add_slab(vs.slab_id, vs.size)
        return out

    def _remotify(self, want_bytes: int) -> bool:
        """Move cold local pages (about ``want_bytes`` of them) to remote slabs. False when nothing moved."""
        freed = moved = 0
        while freed < want_bytes:
            locs, owners = self._victims(self.batch)
            got = len(locs)
            if got == 0:
                break
            sizes = L.loc_size(locs).astype(np.uint32)
            rlocs = self._remote_alloc(sizes, True)
            if rlocs is None:  # remote tier full: ephemeral pages may go, persistent ones stay
                return self._drop_ephemeral(locs, owners) > 0 or moved > 0
            self.remote.write(rlocs, self._local_addrs(locs), self.local_arena.addr)
            ok = np.empty(got, dtype=np.uint8)
            self.map.cas(owners, locs, rlocs, ok)
            moved_mask = ok.astype(bool)
            self.local.free(np.ascontiguousarray(locs[moved_mask]), int(moved_mask.sum()))
            if not moved_mask.all():  # overwritten meanwhile: the new copy stays local
                stale = np.ascontiguousarray(rlocs[~moved_mask])
                self.remote_alloc.free(stale, len(stale))
                self._unswept = True
            moved += int(moved_mask.sum())
            freed += int(sizes[moved_mask].sum())
            if not moved_mask.any():
                break
            self.counters["pages_remoted"] += int(moved_mask.sum())
            self.counters["remotify_batches"] += 1
        return moved > 0

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

    def _drop_ephemeral(self, locs: np.ndarray, owners: np.ndarray) -> int:
        pools = (owners >> np.uint64(56)).astype(np.intp)
        eph = np.array([not self._pools.get(int(p), True) for p in range(K.MAX_POOLS)], dtype=bool)[pools]
        if not eph.any():
            return 0
        zeros = np.zeros(int(eph.sum()), dtype=np.uint64)
        ok = np.zeros(len(zeros), dtype=np.uint8)
        self.map.cas(np.ascontiguousarray(owners[eph]), np.ascontiguousarray(locs[eph]), zeros, ok)
        dropped = np.ascontiguousarray(locs[eph][ok.astype(bool)])
        self.local.free(dropped, len(dropped))
        self.counters["ephemeral_dropped"] += len(dropped)
        return len(dropped)

    def _release_empty_slabs(self) -> None:
        self._unswept = False
        for slab_id in self.remote_alloc.empty_slabs():
            self.remote_alloc.remove_slab(slab_id)
            self.remote.release_slab(slab_id)

    # -- get ------------------------------------------------------------------------------

    def get(self, pool: int, obj: int, index: int, out=None) -> bytes | None:
        """One page, or None on a miss.  The latency path: scalar lookups, one remote op.

        With ``out`` (a writable 4096-byte buffer) the page is decompressed into it and
        ``out`` is returned; without, a new bytes object.
        """
        key = K.pack(pool, obj, index)
        dst = self._one_page if out is None else out
        with self._lock:
            self._check_open()
            self._persistent(pool)
            loc = self.map.get(key)
            self.counters["gets"] += 1
            if loc == 0:
                self.counters["failed_gets"] += 1
                return None
            self.counters["succ_gets"] += 1
            size = (loc >> L.SIZE_SHIFT) & L.SIZE_FIELD if loc & L.KIND_MASK == L.KIND_STORED else 0
            slab = loc >> L.SLAB_SHIFT
            src = 0
            if size and slab <= self.last_local_slab:
                src = int(self.local_base[slab]) + ((loc >> L.OFFSET_SHIFT) & L.OFFSET_FIELD) * L.GRANULE
                self.counters["local_gets"] += 1
            elif size:
                src = self.staging.addr
                self.remote.read_one(loc, src, self.staging.addr)
                self.counters["remote_gets"] += 1
            self._one_src[0] = src
            self._one_size[0] = size
            codec.decompress_pages(self._one_src, self._one_size, 1, dst)
            return bytes(dst) if out is None else out

    def get_many(self, pool: int, obj: int, indexes, out) -> np.ndarray:
        """Read pages into ``out`` (n*4096 writable bytes); returns the found mask.

        Missing pages are zero-filled.
        """
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

    def _get_batch(self, keys: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """One batch: lookup, one C plan (decompress sources and remote READs), the READs, decompress."""
        n = len(keys)
        locs = self._locs[:n]
        self.map.lookup(keys, locs)
        found = np.empty(n, dtype=bool)
        remote, path = self.remote, self._path
        router, lkeys = remote.router(self.staging.addr) if remote is not None else (None, None)
        batches = path.plan_get(locs, n, found, router, lkeys)
        # run_routed: set() when every READ landed; None (not posted) or the failed links otherwise
        if batches is None or (batches and remote.run_routed(batches) != set()):
            return self._get_batch_slow(locs, dst)  # unusual, or a link failed: reads that retry
        c = self.counters
        c["remote_gets"] += path.remote
        c["local_gets"] += path.local
        codec.decompress_pages(path.srcs, path.sizes, n, dst)
        c["gets"] += n
        c["succ_gets"] += path.found
        c["failed_gets"] += n - path.found
        return found

    def _get_batch_slow(self, locs: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """``_get_batch`` in numpy over looked-up ``locs``, for any state of the remote tier."""
        n = len(locs)
        kind = L.loc_kind(locs)
        found = kind != L.KIND_ABSENT
        stored = kind == L.KIND_STORED
        sizes = np.where(stored, L.loc_size(locs), 0).astype(np.uint32)
        srcs = self._srcs[:n]
        srcs[:] = 0
        local = stored & (L.loc_slab(locs) <= self.last_local_slab)
        if local.any():
            srcs[local] = self._local_addrs(locs[local])
        remote = stored & ~local
        if remote.any():
            where = np.flatnonzero(remote)
            self.remote.read(np.ascontiguousarray(locs[where]), self._staging_addrs[where], self.staging.addr)
            srcs[where] = self._staging_addrs[where]
            self.counters["remote_gets"] += len(where)
        self.counters["local_gets"] += int(local.sum())
        codec.decompress_pages(srcs, sizes, n, dst)
        self.counters["gets"] += n
        hits = int(found.sum())
        self.counters["succ_gets"] += hits
        self.counters["failed_gets"] += n - hits
        return found

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
                while moved < max_pages:
                    k = min(self.batch, max_pages - moved)
                    keys, locs = self.map.select(L.SLAB_MASK, np.uint64(slab_id) << np.uint64(L.SLAB_SHIFT), k)
                    if len(keys) == 0:
                        break
                    sizes = L.loc_size(locs).astype(np.uint32)
                    if self.local.free_bytes < int(sizes.sum()) + 8 * L.BLOCK_SIZE:
                        return moved
                    n = len(keys)
                    stage = self._staging_addrs[:n]
                    self.remote.read(locs, stage, self.staging.addr)
                    llocs = np.zeros(n, dtype=np.uint64)
                    got = self.local.alloc(sizes, llocs, keys, n)
                    if got < n:
                        self.local.free(llocs[:got], got)
                        return moved
                    self._copy(self._local_addrs(llocs), stage, sizes, n)
                    ok = self._ok[:n]
                    self.map.cas(keys, locs, llocs, ok)
                    okb = ok.astype(bool)
                    self.local.free(np.ascontiguousarray(llocs[~okb]), int((~okb).sum()))
                    self.remote_alloc.free(np.ascontiguousarray(locs[okb]), int(okb.sum()))
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

    def wants_repatriation(self) -> bool:
        """True while remote pages exist and over half of the local pool is free."""
        return (self.remote is not None and self.remote_alloc.stats()["slots_used"] > 0
                and self.local.free_bytes > self.local.capacity_bytes // 2)

    def check_providers(self) -> list[str]:
        """Heartbeat every live provider; one that is gone is marked dead at once. Returns the newly dead."""
        if self.remote is None:
            return []
        dead = []
        for link in [lk for lk in self.remote.links if lk.alive]:
            try:
                link.client.heartbeat()
            except (errors.RramError, OSError) as exc:
                with self._lock:
                    self.remote.mark_dead(link.index, f"heartbeat failed: {exc}")
                dead.append(link.name)
        return dead

    def drain(self, provider: str) -> int:
        """Start moving every slab off ``provider``; ``repair()`` does the copying."""
        with self._lock:
            link = next((lk for lk in self.remote.links if lk.name == provider), None) if self.remote else None
            if link is None:
                raise errors.NotFound(f"no provider named {provider!r} in this store")
            return self.remote.start_drain(link.index)

    # -- stats / lifetime -----------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            c = dict(self.counters)
            local = self.local.stats()
            remote = self.remote_alloc.stats()
            c["pages"] = len(self.map)
            c["local_pages"] = int(local["slots_used"])
            c["remote_pages"] = int(remote["slots_used"])
            c["local_compressed_bytes"] = int(local["bytes_stored"])
            c["remote_compressed_bytes"] = int(remote["bytes_stored"])
            c["local_budget"] = int(self.local.capacity_bytes)
            c["local_free_bytes"] = int(self.local.free_bytes)
            stored = c["local_compressed_bytes"] + c["remote_compressed_bytes"]
            c["compressed_bytes"] = stored
            c["zero_pages"] = c["pages"] - c["local_pages"] - c["remote_pages"]
            c["compression_ratio"] = round(c["bytes_stored_in"] and c["bytes_in"] / max(1, c["bytes_stored_in"]), 3)
            c["metadata_bytes"] = int(self.map.metadata_bytes())
            if self.remote is not None:
                c["replicas"] = self.remote.replicas
                c["remote_slabs"] = len(self.remote.slabs)
                c["remote_leased_bytes"] = self.remote.leased_bytes()
                c["providers"] = {lk.name: ("dead" if not lk.alive else "draining" if lk.draining else "alive")
                                  for lk in self.remote.links}
                c["degraded_slabs"] = len(self.remote.degraded)
                c["epoch"] = self.remote.epoch
                c.update(self.remote.counters)
            c["codec"] = codec.IMPLEMENTATION
            return c

    def _check_open(self) -> None:
        if self.closed:
            raise errors.RramError("page store is closed")

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.keeper is not None:
                self.keeper.stop()
            if self.remote is not None:
                self.remote.close()
            self.staging.close()
            self.local_arena.close()

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


def _most_free_first(candidates, n, chosen):
    """Default placement: spread slabs round-robin over the candidates, one per failure domain."""
    domains = {lk.failure_domain for lk in chosen if lk.failure_domain}
    spread = [lk for lk in candidates if not lk.failure_domain or lk.failure_domain not in domains]
    pool = spread or candidates
    pool = sorted(pool, key=lambda lk: lk.slabs_placed)
    picks = pool[:n]
    for lk in picks:
        lk.slabs_placed += 1
    return picks


def _copy_batch():
    try:
        from .._ext._memops import copy_batch
    except ImportError:  # pragma: no cover - the extension is required by setup.py
        import ctypes

        def copy_batch(dst, src, lengths, n):
            for i in range(n):
                ctypes.memmove(int(dst[i]), int(src[i]), int(lengths[i]))

    return copy_batch


_DEFAULT_COPY = _copy_batch()
