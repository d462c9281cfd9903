"""The fault handler of a far-memory region: a process of its own, never the region's.

``python -m rram.frontends.farmem.handler --fd N``: N is a Unix socket to the region's
process, which sends ``hello`` with the userfaultfd, the region's memfd and the write end of
its lifeline pipe (rram/frontends/farmem/wire.py).  The handler opens its own PageStore on
the same cluster, maps the memfd and serves the region until ``close`` or end of stream.

Page states (one byte a page):
  ABSENT   not in the memfd: the next touch is a *missing* fault, filled from the store
  CLEAN    mapped write-protected (UFFDIO_COPY_MODE_WP): the first write is a *WP* fault
           (or none: a walk of writes un-protects the CLEAN pages ahead of it, _write_ahead)
  DIRTY    mapped writable: written back to the store before it is dropped
  CACHED   prefetched into the memfd's page cache, not mapped: the next touch is a *minor*
           fault (UFFDIO_CONTINUE, a prefetch hit); dropped unused, it counts as wasted
  EVICTING handed to the writer thread for eviction: ABSENT once reaped
  FETCHING handed to the fetcher thread: CACHED once reaped
A page the store has never held (``stored`` clear: never evicted dirty) is zeros: it is
filled without a store read and mapped writable (DIRTY) at once, since write-protecting it
would only buy a WP fault on its first write.

Three threads (iothread.py, umap's filler/evictor split): this loop keeps the policy and is
the only one to change page states; the fetcher reads prefetched pages from the store into a
staging buffer; the writer writes them into the memfd's page cache and does eviction's I/O,
in the order handed over (both take the memfd's inode lock: one thread, no contention).
Eviction is FIFO over resident pages, started once a fill comes within EVICT_AHEAD of the
budget, so that its I/O overlaps the fills that follow: the writer write-protects the dirty
victims (writes now wait for us), reads them through our mapping, puts them to the store,
then punches every victim out of the memfd.  A fill that would pass the budget itself waits
for the writer.  A fault on an EVICTING or FETCHING page (a write racing with its
write-back, a touch after its punch, a scan overtaking its prefetch) waits until the threads
are done with it, then is served as the page now stands.

While no trend holds, the wait for faults is ``_uffd.serve_faults``: a C loop that serves
batches of missing faults on ABSENT pages itself, through the store's C request path
(ext/_reqpath.pyx), and returns to Python only what needs policy (other states, WP and minor
faults, no room under the budget, a request the C path declines), when a delta among the
pages it served repeats (the predictor then sees them: ``_replay``) or when room runs low or an
eviction may have finished (Python evicts and reaps: ``wait_faults``).

If the store fails, the reason goes down the lifeline and the process exits: the region's
watchdog then makes the region PROT_NONE and faulting threads die with that message.
"""
from __future__ import annotations

import argparse
import errno
import logging
import mmap
import os
import queue
import socket
import sys

import numpy as np

from ...units import PAGE_SIZE
from ... import errors
from ..._ext import _reqpath
from ..._ext import _uffd as U
from . import wire as W
from ...logsetup import configure_logging
from .iothread import IoThread
from .prefetch import Predictor

log = logging.getLogger(__name__)

ABSENT, CLEAN, DIRTY, CACHED, EVICTING, FETCHING = 0, 1, 2, 3, 4, 5
MAX_FAULTS = 512          # messages read per wake-up
MAX_WINDOW = 256          # pages prefetched per run at most (and at most a quarter of the budget:
                          # an eighth cost ~1 µs more handler CPU a scanned page in thread hand-offs)
WRITE_AHEAD = 32          # CLEAN pages un-protected ahead of a run of writes (see _write_ahead)
EVICT_SLACK = 1 / 16      # evict down to budget*(1-slack) (umap's high/low water marks)
EVICT_AHEAD = 1 / 8       # ... once a fill comes this close to the budget: the evictor has time
FETCH_DEPTH = 2           # prefetch windows in flight under advise("sequential") (else one:
                          # a stream of unknown length, 1 MiB chunks say, wasted the second)
FETCH_BUFFERS = 3         # staging buffers between the fetcher and the writer
MIN_FETCH = 32            # pages a fetched batch at least (each costs a store call)
C_ROOM = 32               # the C loop returns this close to its limit so that Python evicts before
                          # a batch must be declined for want of room (the Python path serving it
                          # cost ~1 ms under load: a tenth of the faults of a random read took it)
REAP_AFTER = 8            # ... and after this many pages while an eviction is under way (~100 µs):
                          # a random fault on a page still EVICTING goes the Python way
COUNTERS = ("faults", "missing_faults", "wp_faults", "minor_faults", "filled", "zero_filled",
            "evicted_clean", "evicted_dirty", "written_back", "write_ahead", "prefetched", "prefetch_hits",
            "wasted", "wakeups", "c_faults")


class Region:
    """One region's pages, served from ``store`` pool ``pool`` (object 0, index = page)."""

    def __init__(self, hello: dict, fds: list[int], store, batch: int):
        self.name = str(hello["name"])
        self.base = int(hello["base"])
        self.size = int(hello["size"])
        self.npages = self.size // PAGE_SIZE
        self.budget = max(4, int(hello["budget"]) // PAGE_SIZE)
        self.minor = bool(hello.get("minor"))  # CACHED pages (prefetch) need minor-fault mode
        self.continue_wp = True  # until the kernel says otherwise
        self.uffd, self.memfd, self.lifeline = fds  # ours to close (close())
        self.store = store
        self.pool = store.create_pool(persistent=True)
        self.map = mmap.mmap(self.memfd, self.size, mmap.MAP_SHARED)  # read only for write-back
        self.map.madvise(mmap.MADV_NOHUGEPAGE)
        self.map_addr = np.frombuffer(self.map, dtype=np.uint8).ctypes.data
        self.state = np.zeros(self.npages, dtype=np.uint8)
        self.stored = np.zeros(self.npages, dtype=bool)  # the store holds a copy (a put succeeded)
        self.ring = np.zeros(self.budget + 1, dtype=np.int64)  # FIFO of resident pages
        self.head = self.count = 0
        self.batch = max(16, min(batch, self.budget // 2))
        self.staging = np.zeros(self.batch * PAGE_SIZE, dtype=np.uint8)
        self.staging_addr = self.staging.ctypes.data
        self.evict_staging = np.zeros(self.batch * PAGE_SIZE, dtype=np.uint8)  # the writer's
        self.ahead = int(self.budget * EVICT_AHEAD)
        self._one_addr = np.zeros(1, dtype=np.uint64)  # the latency path's address, reused
        self.predictor = Predictor(max_window=min(MAX_WINDOW, max(1, self.budget // 4)))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._hits_seen = self._wasted_seen = 0
        self.evicting = 0  # pages handed to the writer for eviction, not reaped yet
        # staging buffers between the fetcher (fills one) and the writer (empties it)
        self._buffers: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(FETCH_BUFFERS):
            self._buffers.put(np.zeros(self.batch * PAGE_SIZE, dtype=np.uint8))
        self.writer = IoThread(self._write_io, f"farmem-write-{self.name}")
        self.fetcher = IoThread(self._fetch_io, f"farmem-fetch-{self.name}")
        # the fault loop in C (_uffd.serve_faults) over the store's C request path, while no
        # trend holds: ring head/count/limit, the pages it served lately, its counters
        self.c_path = getattr(store, "requests", None)
        self.key_base = self.pool << 56  # (pool, object 0, index 0): rram.datapath.keys
        self.pos = np.zeros(4, dtype=np.int64)
        self.c_room = max(1, min(C_ROOM, self.budget // 8))
        self.c_done = _reqpath.REQ["done"]
        self.hist = np.zeros(U.HISTORY + 1, dtype=np.int64)
        self.c_counters = np.zeros(5, dtype=np.uint64)

    def close(self) -> None:
        """Forget the region: its pages leave the store, its fds are closed."""
        self.fetcher.close()
        self.writer.close()
        try:
            self.store.invalidate_pool(self.pool)
        except Exception as exc:  # noqa: BLE001 - the store may be the reason we stop
            log.info("region %s: pool not invalidated: %s", self.name, exc)
        self.map.close()
        for fd in (self.uffd, self.memfd, self.lifeline):
            os.close(fd)

    # -- residency ---------------------------------------------------------------------------

    def _push(self, pages: np.ndarray) -> None:
        cap = len(self.ring)
        at = (self.head + self.count + np.arange(len(pages))) % cap
        self.ring[at] = pages
        self.count += len(pages)

    def make_room(self, n: int) -> None:
        """Evict so that ``n`` more pages fit under the budget: the oldest resident pages go to
        the writer once the fill comes within ``ahead`` of the budget (down to ``slack``
        under it), and this waits for it only while the fill would pass the budget itself."""
        if self.writer.inflight:
            self.reap()
        over = self.count + n - (self.budget - self.ahead)  # EVICTING pages are on their way out
        if over > 0 and self.count:
            k = min(self.count, over + int(self.budget * EVICT_SLACK))
            at = (self.head + np.arange(k)) % len(self.ring)
            victims = np.sort(self.ring[at])
            if (self.state[victims] == FETCHING).any():  # a tiny budget: prefetched pages first
                self._settle(victims)
            self.head = (self.head + k) % len(self.ring)
            self.count -= k
            self.evict(victims)
        while self.evicting and self.count + self.evicting + n > self.budget:
            self._reaped(self.writer.wait())

    def evict(self, victims: np.ndarray) -> None:
        """Hand ``victims`` (resident, sorted) to the writer: EVICTING until reaped."""
        st = self.state[victims]
        dirty = victims[st == DIRTY]
        self.counters["wasted"] += int((st == CACHED).sum())
        self.counters["evicted_dirty"] += len(dirty)
        self.counters["evicted_clean"] += len(victims) - len(dirty)
        self.state[victims] = EVICTING
        self.evicting += len(victims)
        self.writer.submit(victims, (dirty,))

    def _write_io(self, pages: np.ndarray, job: tuple) -> None:
        """The writer thread's part: a fetched batch into the memfd's page cache (job: its
        buffer), or an eviction (job: its dirty pages), in the order they were handed over:
        both take the memfd's inode lock, so one thread does both, without contention."""
        if len(job) == 2:
            buf = job[0]
            U.write_pages(self.memfd, (pages * PAGE_SIZE).astype(np.uint64), len(pages), buf.ctypes.data)
            self._buffers.put(buf)
            return
        dirty = job[0]
        if len(dirty):
            # stop writes first: a write from now on waits as a WP fault until we are done
            U.writeprotect_pages(self.uffd, self._addrs(dirty), len(dirty), True)
            staging = self.evict_staging
            for i in range(0, len(dirty), self.batch):
                chunk = dirty[i:i + self.batch]
                offs = (chunk * PAGE_SIZE).astype(np.uint64)
                U.gather_pages(self.map_addr, offs, len(chunk), staging.ctypes.data)
                # all-zero pages cost the store a page-map entry, no remote write (its codec
                # sees them); stored, they come back write-protected like any other, which keeps
                # the runs of a later scan all one kind (one CONTINUE a run, not one a page)
                self.store.put_many(self.pool, 0, chunk, staging[:len(chunk) * PAGE_SIZE])
        U.punch_pages(self.memfd, (pages * PAGE_SIZE).astype(np.uint64), len(pages))

    def _fetch_io(self, pages: np.ndarray, _job) -> None:
        """The fetcher thread's part: ``pages`` from the store into a free buffer, handed to
        the writer (which frees the buffer once it wrote it into the page cache)."""
        while True:
            try:
                buf = self._buffers.get(timeout=1.0)
                break
            except queue.Empty:
                self.writer.check()  # a failed writer frees nothing: do not wait for it
        zeros = self._fetch(pages, buf)
        self.writer.submit(pages, (buf, zeros))

    def _reaped(self, batches) -> None:
        c = self.counters
        for pages, job in batches:
            if len(job) == 2:
                self.state[pages] = CACHED
                c["zero_filled"] += job[1]
            else:
                self.state[pages] = ABSENT
                self.stored[job[0]] = True
                self.evicting -= len(pages)
                c["written_back"] += len(job[0])

    def reap(self) -> None:
        """Take in what the I/O threads finished (and raise what failed there)."""
        if self.fetcher.inflight:
            self.fetcher.reap()
        if self.writer.inflight:
            self._reaped(self.writer.reap())

    def _settle(self, pages) -> None:
        """Wait until no page of ``pages`` is EVICTING or FETCHING (a fault on one: after the
        I/O threads that hold it).  The fetcher hands its batch to the writer before it is done."""
        st = self.state[pages]
        busy = np.atleast_1d(pages)[(st == FETCHING) | (st == EVICTING)]
        if len(busy):
            self.fetcher.wait_for(busy)
            self._reaped(self.writer.wait_for(busy))

    def _addrs(self, pages: np.ndarray) -> np.ndarray:
        return (self.base + pages * PAGE_SIZE).astype(np.uint64)

    # -- faults ------------------------------------------------------------------------------

    def wait_faults(self, addrs: np.ndarray, flags: np.ndarray, ctl_fd: int, first_spin: int, spin: int):
        """Wait for fault messages: ``(n, control socket readable)``, n of them for ``serve``.
        While no trend holds, the C loop serves the missing faults it can itself (no Python
        per fault) and returns only what needs policy; a repeating delta among the pages it
        served sends them to the predictor."""
        if self.c_path is None or self.predictor.trend() is not None:
            return U.read_faults(self.uffd, addrs, flags, 1000, ctl_fd, first_spin)
        pos, hist = self.pos, self.hist
        # no further than eviction would start, and never past the budget with EVICTING pages
        limit = min(self.budget - self.ahead, self.budget - self.evicting)
        if self.count + self.c_room > limit:  # make_room leaves count + c_room <= the new limit
            self.make_room(self.c_room)
            limit = min(self.budget - self.ahead, self.budget - self.evicting)
        pos[U.POS_HEAD] = self.head
        pos[U.POS_COUNT] = self.count
        pos[U.POS_LIMIT] = limit
        # EVICTING pages are declined by C (the writer may not have punched them yet) until
        # Python reaps them: with an eviction under way, come back after a few faults
        pos[U.POS_LOW] = min(limit - self.c_room, self.count + REAP_AFTER) if self.evicting else limit - self.c_room
        seen = int(hist[U.HISTORY])
        n, ctl, trend = U.serve_faults(self.uffd, addrs, flags, 1000, ctl_fd, first_spin, spin, self.c_path,
                                       self.key_base, self.base, self.state, self.stored.view(np.uint8),
                                       self.ring, pos, hist, self.c_counters, self.staging_addr, self.batch)
        self.count = int(pos[U.POS_COUNT])
        total = int(hist[U.HISTORY])
        if total != seen:
            if trend:
                self._replay(total)
            else:
                self.predictor.skip_to(int(hist[(total - 1) % U.HISTORY]))
        return n, ctl

    def _replay(self, total: int) -> None:
        """The pages the C loop served lately, to the predictor; then prefetch along a trend
        it finds, or let the C loop start a fresh history (a repeat that made no trend)."""
        m = min(total, U.HISTORY)
        pages = [int(self.hist[i % U.HISTORY]) for i in range(total - m, total)]
        self.predictor.skip_to(pages[0])
        for p in pages[1:]:
            self.predictor.on_fault(p)
        if self.predictor.trend() is None:
            self.hist[U.HISTORY] = 0
        elif self.minor:
            self._prefetch_after(pages[-1])

    def serve(self, addrs: np.ndarray, flags: np.ndarray) -> None:
        c = self.counters
        c["wakeups"] += 1
        c["faults"] += len(addrs)
        if len(addrs) == 1:  # the latency path: scalars, no numpy per fault
            return self._serve_one(int(addrs[0]), int(flags[0]))
        pages = ((addrs - self.base) // PAGE_SIZE).astype(np.int64)
        inside = (addrs >= self.base) & (pages < self.npages)
        pages, flags = pages[inside], flags[inside]
        self.reap()
        self._settle(pages)
        st = self.state[pages]
        wpf, minor = (flags & U.FLAG_WP) != 0, (flags & U.FLAG_MINOR) != 0
        mapped = (st == CLEAN) | (st == DIRTY)
        # a write to a mapped page: it becomes DIRTY; un-protecting wakes the writer
        wp = np.unique(pages[mapped & wpf])
        if len(wp):
            self._unprotect(wp)
        # in the page cache but not mapped: prefetched (a hit), or unmapped by MADV_DONTNEED
        cont = np.unique(pages[(st == CACHED) | (mapped & minor)])
        if len(cont):
            self._continue(cont)
        missing = st == ABSENT
        if missing.any():
            self.fill(pages[missing], flags[missing])
        # every message gets a wake: a thread whose page is there goes on, any other faults
        # again (a message about a page mapped since, or prefetched by the steps above)
        woken = np.unique(pages)
        U.wake_pages(self.uffd, self._addrs(woken), len(woken))

    def _serve_one(self, addr: int, flags: int) -> None:
        """``serve`` for one message; the same decisions."""
        page = (addr - self.base) // PAGE_SIZE
        if not 0 <= page < self.npages:
            return
        self.reap()
        st = self.state[page]
        if st == EVICTING or st == FETCHING:
            self._settle(page)
            st = self.state[page]
        if st == CLEAN or st == DIRTY or st == CACHED:
            self._serve_mapped(page, st, flags)
        else:
            self.counters["missing_faults"] += 1
            self.predictor.on_fault(page)
            fresh = not self.stored[page]
            wp = not (fresh or flags & U.FLAG_WRITE)
            self.make_room(1)
            staged = self.staging[:PAGE_SIZE]
            if fresh:
                staged[:] = 0
                self.counters["zero_filled"] += 1
            elif self.c_path is None or self.c_path.read(self.key_base | page, staged) != self.c_done:
                if self.store.get(self.pool, 0, page, staged) is None:
                    self.counters["zero_filled"] += 1
            addr = self._one_addr
            addr[0] = self.base + page * PAGE_SIZE
            if not U.copy_pages(self.uffd, addr, self.staging_addr, 1, wp):
                U.wake_pages(self.uffd, addr, 1)  # present already: the waiter goes on
            self.state[page] = CLEAN if wp else DIRTY
            self.ring[(self.head + self.count) % len(self.ring)] = page  # _push, scalar
            self.count += 1
            self.counters["filled"] += 1
            if self.minor and self.predictor.trend():
                self._prefetch_after(page)

    def _serve_mapped(self, page: int, st: int, flags: int) -> None:
        one = np.array([page], dtype=np.int64)
        if st == CACHED:
            self._continue(one)
        elif flags & U.FLAG_WP:
            self._unprotect(one)
        elif flags & U.FLAG_MINOR:
            self._continue(one)
        else:
            U.wake_pages(self.uffd, self._addrs(one), 1)

    def _unprotect(self, pages: np.ndarray) -> None:
        self.counters["wp_faults"] += len(pages)
        self.state[pages] = DIRTY
        U.writeprotect_pages(self.uffd, self._addrs(pages), len(pages), False, True)
        self._write_ahead(int(pages[-1]))

    def _write_ahead(self, page: int) -> None:
        """Writes walking up the pages (an in-place update: each page read, then written) cost
        a WP fault a page.  After three in a row, un-protect the CLEAN pages mapped right after
        the last one, WRITE_AHEAD at most, and count them DIRTY: a page the stream then leaves
        unwritten is put at eviction for nothing (``write_ahead`` counts them all), which is
        safe and bounds the waste by WRITE_AHEAD a stream."""
        if page < 2 or self.state[page - 1] != DIRTY or self.state[page - 2] != DIRTY:
            return
        seg = self.state[page + 1:min(self.npages, page + 1 + WRITE_AHEAD)] == CLEAN
        n = len(seg) if seg.all() else int(np.argmin(seg))
        if n:
            ahead = np.arange(page + 1, page + 1 + n, dtype=np.int64)
            self.state[ahead] = DIRTY
            U.writeprotect_pages(self.uffd, self._addrs(ahead), n, False, False)
            self.counters["write_ahead"] += n

    def _continue(self, pages: np.ndarray) -> None:
        """Map pages that are in the memfd's page cache.  Write-protected where the kernel can
        (6.5+), so clean ones stay CLEAN; older kernels map them writable: they count as DIRTY.

        A touch of a prefetched page also maps the prefetched run after it (along a +1/-1
        trend) so a scan takes one fault per run, and prefetches the next run: every page
        mapped this way counts as a prefetch hit."""
        c = self.counters
        c["minor_faults"] += len(pages)
        st = self.state[pages]
        touched = pages[st == CACHED]
        if len(touched):
            self.predictor.on_fault(int(touched[-1]))
            d = self.predictor.trend()
            if d in (1, -1) and len(touched) == 1:
                run = self._cached_run(int(touched[0]), d)
                pages, st = run, self.state[run]
                self.predictor.skip_to(int(run[-1] if d == 1 else run[0]))
            c["prefetch_hits"] += int((st == CACHED).sum())
        # never-stored pages are zeros with nothing to protect: writable and DIRTY at once
        writable = (st == DIRTY) | ~self.stored[pages]
        dirty, clean = pages[writable], pages[~writable]
        self.state[dirty] = DIRTY
        if len(dirty):
            U.continue_pages(self.uffd, self._addrs(dirty), len(dirty), False)
        if len(clean) and self.continue_wp:
            try:
                U.continue_pages(self.uffd, self._addrs(clean), len(clean), True)
                self.state[clean] = CLEAN
                clean = clean[:0]
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.info("region %s: no UFFDIO_CONTINUE_MODE_WP (Linux < 6.5): prefetched pages count as dirty",
                         self.name)
                self.continue_wp = False
        if len(clean):
            U.continue_pages(self.uffd, self._addrs(clean), len(clean), False)
            self.state[clean] = DIRTY
        if len(touched):
            self._feedback()
            self._prefetch_after(self.predictor.last)

    def _cached_run(self, page: int, d: int) -> np.ndarray:
        """``page`` and the CACHED pages right after it along ``d`` (sorted)."""
        limit = self.predictor.window
        if d == 1:
            seg = self.state[page:min(self.npages, page + limit)]
            n = int(np.argmin(seg == CACHED)) if not (seg == CACHED).all() else len(seg)
            return np.arange(page, page + max(1, n), dtype=np.int64)
        seg = self.state[max(0, page - limit + 1):page + 1][::-1]
        n = int(np.argmin(seg == CACHED)) if not (seg == CACHED).all() else len(seg)
        return np.arange(page - max(1, n) + 1, page + 1, dtype=np.int64)

    def _prefetch_after(self, page: int) -> None:
        if not self.minor:
            return
        depth = FETCH_DEPTH if self.predictor.advice == "sequential" else 1
        ahead = self.predictor.ahead(page, self.npages, depth)
        if ahead:
            ahead = np.array(ahead, dtype=np.int64)
            ahead = np.sort(ahead[self.state[ahead] == ABSENT][: self.budget // 4])
            if len(ahead):
                self.cache(ahead)

    def fill(self, pages: np.ndarray, flags: np.ndarray) -> None:
        """Missing pages, several at once: reads of stored pages mapped write-protected (the
        first write then faults: dirty tracking); writes, and pages never stored (zeros, no
        store read), mapped writable and DIRTY; then prefetch."""
        c = self.counters
        still = self.state[pages] == ABSENT  # a prefetch since the message may have brought some
        pages, flags = pages[still], flags[still]
        if not len(pages):
            return
        # a few messages a wake-up: plain Python sorts them quicker than numpy's set operations
        written: dict[int, bool] = {}
        for p, f in zip(pages.tolist(), flags.tolist()):
            written[p] = written.get(p, False) or bool(f & U.FLAG_WRITE)
            self.predictor.on_fault(p)
        every = sorted(written)
        stored = self.stored[every].tolist()
        reads = np.array([p for p, s in zip(every, stored) if s and not written[p]], dtype=np.int64)
        writes = np.array([p for p, s in zip(every, stored) if s and written[p]], dtype=np.int64)
        fresh = np.array([p for p, s in zip(every, stored) if not s], dtype=np.int64)
        c["missing_faults"] += len(every)
        for group, wp in ((reads, True), (writes, False), (fresh, False)):
            for i in range(0, len(group), self.batch):
                chunk = group[i:i + self.batch]
                self.make_room(len(chunk))
                self.counters["zero_filled"] += self._fetch(chunk, self.staging)
                U.copy_pages(self.uffd, self._addrs(chunk), self.staging_addr, len(chunk), wp)
                self.state[chunk] = CLEAN if wp else DIRTY
                self._push(chunk)
        c["filled"] += len(every)
        self._feedback()
        if self.minor and self.predictor.trend():
            self._prefetch_after(int(pages[-1]))

    def _fetch(self, pages: np.ndarray, staging: np.ndarray) -> int:
        """``pages`` into ``staging``; pages never stored are zeroed, not looked up.  Returns
        how many were zeros.  The store's C request path first (GIL released, no Python per
        batch: the fetcher and the fault loop run beside each other), its Python path for what
        C declines (failover, routes to bind, a sealed page that does not open)."""
        staged = staging[:len(pages) * PAGE_SIZE]
        stored = self.stored[pages]
        if not stored.any():
            staged[:] = 0
            return len(pages)
        if self.c_path is not None and self.c_path.read_many(self.key_base, pages.astype(np.uint32), staged) == self.c_done:
            return len(pages) - int(np.count_nonzero(stored))  # as the C fault loop counts them
        found = self.store.get_many(self.pool, 0, pages, staged)
        return len(pages) - int(np.count_nonzero(found))

    def cache(self, pages: np.ndarray) -> None:
        """Prefetch ``pages`` (ABSENT, sorted) into the memfd's page cache, unmapped: FETCHING
        now, CACHED once reaped.  In batches of about a window: the fetcher reads one while
        the writer writes the one before."""
        step = min(self.batch, max(MIN_FETCH, self.predictor.window))
        for i in range(0, len(pages), step):
            chunk = pages[i:i + step]
            self.make_room(len(chunk))
            self.state[chunk] = FETCHING
            self._push(chunk)
            self.counters["prefetched"] += len(chunk)
            self.fetcher.submit(chunk)

    def _counted(self) -> dict:
        """The counters, with what the C loop counted."""
        out = dict(self.counters)
        cc = self.c_counters.tolist()
        missing = cc[U.C_MISSING]
        out["faults"] += cc[U.C_FAULTS]
        out["missing_faults"] += missing
        out["filled"] += missing
        out["zero_filled"] += cc[U.C_ZERO]
        out["wakeups"] += cc[U.C_WAKEUPS]
        out["c_faults"] += cc[U.C_FAULTS]
        return out

    def _feedback(self) -> None:
        c = self.counters
        hits, wasted = c["prefetch_hits"] - self._hits_seen, c["wasted"] - self._wasted_seen
        if hits or wasted:
            self.predictor.feedback(hits, wasted)
            self._hits_seen, self._wasted_seen = c["prefetch_hits"], c["wasted"]

    # -- requests ----------------------------------------------------------------------------

    def request(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "stats":
            return {"ok": True, "counters": self._counted(), "resident": self.count + self.evicting,
                    "budget_pages": self.budget, "window": self.predictor.window}
        if op == "prefetch":
            if not self.minor:
                return {"ok": False, "error": "prefetch needs UFFD_FEATURE_MINOR_SHMEM, which this kernel lacks"}
            try:  # a bad field (it was a KeyError or ValueError) failed the whole region
                first, last = W.prefetch_range(msg, self.npages, PAGE_SIZE)
            except errors.ProtocolError as exc:
                return {"ok": False, "error": str(exc)}
            pages = np.arange(first, last, dtype=np.int64)
            pages = pages[self.state[pages] == ABSENT][: self.budget // 2]
            self.cache(pages)
            return {"ok": True, "pages": len(pages)}
        if op == "advise":
            try:
                self.predictor.advise(str(msg.get("advice")))
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {op!r}"}


def recv_hello(reader: W.Reader) -> tuple[dict, list[int]]:
    """The region's hello and its fds; ProtocolError (fds closed) when it is not one."""
    hello, fds = reader.recv()
    if hello is None or hello.get("op") != "hello" or len(fds) != len(W.HELLO_FDS):
        for fd in fds:
            os.close(fd)
        raise errors.ProtocolError(f"expected hello with {len(W.HELLO_FDS)} fds, got {hello!r} with {len(fds)}")
    return hello, fds


def run(region: Region, sock: socket.socket, reader: W.Reader, spin_us: int) -> str:
    """Serve ``region`` until a ``close`` request ("close": the caller answers it once the
    region is released) or end of stream ("eof").  A failure goes down the lifeline, where the
    region's watchdog turns it into loud faults ("failed")."""
    addrs = np.zeros(MAX_FAULTS, dtype=np.uint64)
    flags = np.zeros(MAX_FAULTS, dtype=np.uint64)
    n = 0
    try:
        while True:
            # spin only right after work: an idle region costs no CPU
            n, ctl = region.wait_faults(addrs, flags, sock.fileno(), spin_us if n else 0, spin_us)
            if n:
                region.serve(addrs[:n].copy(), flags[:n].copy())
            else:  # idle: take in what the I/O threads finished, and their failures
                region.reap()
            while ctl or reader.pending():
                ctl = False
                msg, _ = reader.recv()
                if msg is None:
                    return "eof"
                if msg.get("op") == "close":
                    return "close"
                W.send(sock, region.request(msg))
    except Exception as exc:  # noqa: BLE001 - any failure must reach the faulting threads
        why = f"its handler failed: {type(exc).__name__}: {exc}"
        log.error("far-memory region %s: %s", region.name, why)
        try:
            os.write(region.lifeline, why.encode()[:190])
        except OSError:
            pass
        return "failed"


def serve(sock: socket.socket) -> int:
    """The handler process of one region: its own store, then ``run``."""
    reader = W.Reader(sock)
    try:
        hello, fds = recv_hello(reader)
    except errors.ProtocolError as exc:
        log.error("far-memory handler: %s", exc)
        return 2
    store = region = None
    try:
        from ...cluster import open_store

        store = open_store(hello["config"], **hello.get("store", {}))
        region = Region(hello, fds, store, batch=store.batch)
    except Exception as exc:  # noqa: BLE001 - reported to the region's process, which raises it
        W.send(sock, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        if store is not None:
            store.close()
        return 1
    W.send(sock, {"ok": True, "pid": os.getpid()})
    end = "failed"
    try:
        end = run(region, sock, reader, int(hello.get("spin_us", 0)))
    finally:
        region.close()
        try:
            store.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    if end == "close":
        W.send(sock, {"ok": True})
    return 1 if end == "failed" else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rram.frontends.farmem.handler")
    ap.add_argument("--fd", type=int, required=True, help="Unix socket to the region's process")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    configure_logging(args.verbose, 0)
    sock = socket.socket(fileno=args.fd)
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
