"""The fast path of the page store's I/O: a batch in a few C calls, or "not done".

It completes a batch only in the common case: every remote page has a ready replica on a live
link, no link has batches outstanding, each link's share fits its ``max_batch``, no drain or
repair is copying a slab, and every posted batch succeeds.  Then

* a get is one C call (``StorePath.plan_get``: classification, decompress sources, and the
  READs written straight into each link's op array by the ``Router``), one post and one poll
  per link, and one decompress call; a single page skips even the plan (scalar lookups, one
  READ: the latency path);
* a remote write or read is one ``Router.route`` call, then the posts and polls.

In any other case it answers None or False, with nothing to undo (a link that failed is
suspended), and ``PageStore`` hands the whole batch to the failover path (failover.py).

A get's READs go out in chunks of about the endpoint's ``read_chunk`` bytes (tcp: a provider
answers a batch as one frame, so smaller frames overlap its sending with our receiving).  With
sealed pages, remote pages are READ into the seal buffer and each chunk's pages are opened in
one C call as soon as it lands (``opener``: seal.PlannedOpen, through ``run_routed``'s
``on_done``), while the next chunks and the other links' READs are still in flight; pages whose
tag failed are recovered from other copies before the decompress call.
"""
from __future__ import annotations

import array

import numpy as np

from .. import errors
from .._ext._storepath import StorePath
from ..transport import OP_READ, completion_error, new_completions, new_ops
from ..transport.base import WC_SUCCESS
from . import codec
from . import slab as L
from .remote import LINK_FAILURE_STATUSES, RemoteTier
from .seal import TAG


class FastPath:
    """The common case of get batches and remote reads/writes; see the module docstring."""

    def __init__(self, tier: RemoteTier | None, path: StorePath | None, local_base: np.ndarray | None,
                 staging_base: int, opener=None, open_one=None):
        self.tier = tier
        self.path = path  # the store's C batch steps and their scratch arrays
        # local slab id -> address of the slab (fixed for the store's life); a list, like the
        # array.arrays below, because one-element numpy reads and writes cost ~150 ns each and the
        # one-page branch of ``get`` is the latency path
        self.local_base = None if local_base is None else [int(a) for a in local_base]
        self.staging_base = staging_base  # the registered arena remote pages are READ into
        # PageStore._open_planned and _open_remote_one when pages are sealed, else None
        self.open = opener
        self.open_one = open_one
        self._comp = new_completions(1)
        one = new_ops(1)  # the single READ of the latency path: per-field views, set without numpy dispatch
        one["opcode"] = OP_READ
        fields = ("local_addr", "remote_addr", "length", "lkey", "rkey")
        self._one = {"ops": one, **{name: one[name] for name in fields}}
        self._one_src = array.array("Q", [0])  # uint64 decompress source
        self._one_size = array.array("I", [0])  # uint32 stored size

    def get(self, locs: np.ndarray | int, dst, keys) -> tuple[np.ndarray | bool, int, int, int] | None:
        """Decompress the pages at looked-up ``locs`` of ``keys`` into ``dst``: (found, hits, local,
        remote), or None.

        ``locs`` and ``keys`` are uint64 arrays, or one location and key as ints (``PageStore.get``:
        no array set-up).
        """
        if isinstance(locs, int):  # one page, scalar: the latency path
            kind = locs & L.KIND_MASK
            size = (locs >> L.SIZE_SHIFT) & L.SIZE_FIELD if kind == L.KIND_STORED else 0
            slab = locs >> L.SLAB_SHIFT
            src = nlocal = nremote = 0
            if size and slab < L.FIRST_REMOTE_SLAB:
                src = self.local_base[slab] + ((locs >> L.OFFSET_SHIFT) & L.OFFSET_FIELD) * L.GRANULE
                nlocal = 1
            elif size:
                if self.tier is None or not self._read_one(locs, self.staging_base):
                    return None
                src = self.staging_base
                nremote = 1
                if self.open_one is not None:
                    self.open_one(locs, keys, src)
                    size -= TAG
            self._one_src[0] = src
            self._one_size[0] = size
            codec.decompress_pages(self._one_src, self._one_size, 1, dst)
            hit = kind != L.KIND_ABSENT
            return hit, int(hit), nlocal, nremote
        n = len(locs)
        tier, path = self.tier, self.path
        router, lkeys = tier.router(self.staging_base) if tier is not None else (None, None)
        found = np.empty(n, dtype=bool)
        batches = path.plan_get(locs, n, found, router, lkeys)
        if batches is None:
            return None
        if batches:
            # sealed: each chunk's pages are opened as soon as its READs land (sizes become the
            # images'), while the rest are still in flight; a failed tag is recovered from
            # another copy after the last link
            opener = None if self.open is None else self.open(locs, keys, path.sizes)
            # run_routed: set() when every READ landed; None (nothing posted) or the failed links otherwise
            if tier.run_routed(batches, on_done=None if opener is None else opener.landed, chunked=True) != set():
                return None
            if opener is not None:
                opener.finish(path.srcs)
        codec.decompress_pages(path.srcs, path.sizes, n, dst)
        return found, path.found, path.local, path.remote

    def read(self, remote_locs: np.ndarray, local_addrs: np.ndarray, local_base: int) -> bool:
        """READ each page from its first ready replica; False when that is not the whole story."""
        router, lkeys = self.tier.router(local_base)
        batches = router.route(False, remote_locs, local_addrs, len(remote_locs), lkeys)
        return batches is not None and self.tier.run_routed(batches) == set()

    def write(self, remote_locs: np.ndarray, local_addrs: np.ndarray, local_base: int) -> bool:
        """WRITE each page to every live replica; False when that is not the whole story."""
        tier = self.tier
        if tier.repairing:  # the copy a drain or repair is moving away from must be written too
            return False
        router, lkeys = tier.router(local_base)
        batches = router.route(True, remote_locs, local_addrs, len(remote_locs), lkeys)
        return batches is not None and tier.run_routed(batches, tier.io_timeout) == set()

    def _read_one(self, loc: int, dst_addr: int) -> bool:
        """One page's stored bytes into ``dst_addr`` (in the staging arena): scalar, one READ."""
        tier = self.tier
        slab = loc >> L.SLAB_SHIFT
        for k in range(tier.replicas):
            j = (slab + k) % tier.replicas  # spread reads: each slab starts at its own replica
            li = int(tier.rep_link[j, slab])
            if li >= 0 and tier.rep_ready[j, slab] and tier.links[li].alive:
                break
        else:
            return False
        link = tier.links[li]
        ep = link.endpoint
        if ep.outstanding:
            return False
        f = self._one
        f["local_addr"][0] = dst_addr
        f["remote_addr"][0] = int(tier.rep_addr[j, slab]) + ((loc >> L.OFFSET_SHIFT) & L.OFFSET_FIELD) * L.GRANULE
        f["length"][0] = (loc >> L.SIZE_SHIFT) & L.SIZE_FIELD
        f["lkey"][0] = link.lkeys[self.staging_base]
        f["rkey"][0] = int(tier.rep_rkey[j, slab])
        batch = link.next_batch
        link.next_batch += 1
        try:
            ep.post(f["ops"], batch)
            n = ep.poll(self._comp, tier.read_timeout)
        except errors.TransportError as exc:
            tier.suspend(li, str(exc))  # the failover path reads another replica
            return False
        c = self._comp[0]
        if n == 0 or c["status"] in LINK_FAILURE_STATUSES:
            tier.suspend(li, f"no completion in {tier.read_timeout:g}s" if n == 0 else "link failure")
            return False
        if c["status"] != WC_SUCCESS or int(c["batch_id"]) != batch:
            raise completion_error(int(c["status"]), int(c["batch_id"]), int(c["index"]), link.name)
        return True
