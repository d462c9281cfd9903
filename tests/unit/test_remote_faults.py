"""RemoteTier under faults, over recording endpoints: reads spread, suspend, resume, resync."""
from __future__ import annotations

import numpy as np
import pytest

from rram.datapath import slab as L
from rram.datapath.remote import Link, RemoteTier, Replica, VirtualSlab
from rram.transport.base import WC_LOC_PROT_ERR, RemoteRegion

from rram.datapath.fastpath import FastPath

from .test_storepath import BASE, FIRST, RecordingEndpoint, StubClient, remote_io

NSLABS = 8


def tier_on_two_links(replicas=2):
    tier = RemoteTier(slab_size=1 << 20, replicas=replicas, first_slab_id=FIRST)
    for i in range(2):
        tier.add_link(Link(index=-1, name=f"p{i}", client=StubClient(), endpoint=RecordingEndpoint(64),
                           lkeys={BASE: 100 + i}))
    for s in range(FIRST, FIRST + NSLABS):  # replica 0 always on p0: without spreading p0 serves every read
        tier._install(VirtualSlab(s, 1 << 20, [Replica(j, 1000 * j + s, RemoteRegion((s + 1) << 24, 1 << 20, 7))
                                               for j in range(replicas)]))
    return tier


def locs(n=64):
    slab = (FIRST + np.arange(n) % NSLABS).astype(np.uint64)
    return (slab << np.uint64(L.SLAB_SHIFT)) | (np.uint64(64) << np.uint64(L.SIZE_SHIFT)) | np.uint64(L.KIND_STORED)


def reads_per_link(tier):
    out = [sum(len(b) for b in lk.endpoint.posted) for lk in tier.links]
    for lk in tier.links:
        lk.endpoint.posted.clear()
    return out


@pytest.mark.parametrize("path", ["router", "slow", "one"])
def test_reads_start_at_each_slab_s_own_replica(path):
    tier = tier_on_two_links()
    ls = locs()
    addrs = np.full(len(ls), BASE, dtype=np.uint64)
    if path == "router":
        remote_io(tier, "read", ls, addrs)
    elif path == "slow":
        remote_io(tier, "read", ls, addrs, fast=False)
    else:
        fast = FastPath(tier, None, None, BASE)
        for loc in ls.tolist():
            assert fast._read_one(loc, BASE)
    assert reads_per_link(tier) == [32, 32]


def test_writes_skip_a_suspended_link_and_only_its_missed_slabs_resync_on_resume():
    tier = tier_on_two_links()
    ls = locs(16)[:3]  # slabs FIRST, FIRST+1, FIRST+2
    addrs = np.full(len(ls), BASE, dtype=np.uint64)
    tier.suspend(1, "test")
    assert tier.links[1].lkeys == {} and not tier.links[1].alive
    remote_io(tier, "write", ls, addrs)
    assert reads_per_link(tier) == [3, 0] and tier.links[1].missed == {FIRST, FIRST + 1, FIRST + 2}
    remote_io(tier, "read", ls, addrs)
    assert reads_per_link(tier) == [3, 0], "reads stay off the suspended copy"
    assert tier.degraded == set(), "suspension alone re-replicates nothing"
    tier.links[1].lkeys[BASE] = 101  # what the store's resume_provider registers again
    assert tier.resume(1) == 3
    assert tier.degraded == {FIRST, FIRST + 1, FIRST + 2}
    assert not tier.rep_ready[1, FIRST : FIRST + 3].any() and tier.rep_ready[1, FIRST + 3 :FIRST + NSLABS].all()
    copied = 0
    while tier.degraded:
        n = tier.repair_step(lambda cands, n, chosen: [], BASE, 1 << 20)
        assert n > 0, "a resync copies in place: it needs no placement"
        copied += n
    assert copied == 3 << 20 and tier.counters["slabs_resynced"] == 3 and tier.counters["slabs_rereplicated"] == 0
    assert tier.rep_ready[:, FIRST : FIRST + NSLABS].all()


def test_a_suspended_link_declared_dead_is_rereplicated():
    tier = tier_on_two_links()
    tier.suspend(1, "test")
    tier.mark_dead(1, "dead threshold")
    assert tier.degraded == set(range(FIRST, FIRST + NSLABS)) and not tier.links[1].suspended


class LateEndpoint(RecordingEndpoint):
    """Delivers, before anything else, the error completion of a batch given up on earlier."""

    def __init__(self, max_batch, stale_batch):
        super().__init__(max_batch)
        self.stale = [stale_batch]

    @property
    def outstanding(self) -> int:
        return 0  # as after a resume: the endpoint's own count was reset with the abandoned batch

    def poll(self, out, timeout=None):
        n = 0
        for batch in self.stale:
            out[n] = (batch, WC_LOC_PROT_ERR, 0)  # its buffer was deregistered by the suspension
            n += 1
        self.stale.clear()
        for batch in self.done:
            out[n] = (batch, 0, 0)
            n += 1
        self.done.clear()
        return n


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("fast", [True, False])
def test_a_late_error_completion_of_an_abandoned_batch_is_not_the_current_call_s(op, fast):
    """Seen in the VM: after a lossy link's provider was suspended and resumed, the error
    completions of batches abandoned at the suspension failed the next swap writes."""
    tier = tier_on_two_links()
    for lk in tier.links:
        lk.endpoint = LateEndpoint(64, stale_batch=lk.next_batch + 1000)
    ls = locs(16)
    remote_io(tier, op, ls, np.full(len(ls), BASE, dtype=np.uint64), fast=fast)
    assert all(lk.alive for lk in tier.links)
    assert tier.counters["stale_completions"] >= 1


class TrickleEndpoint(RecordingEndpoint):
    """Chunks a get's READs (``read_chunk`` bytes) and completes one batch per poll, as a
    provider answering frame by frame does."""

    read_chunk = 256

    def __init__(self, max_batch):
        super().__init__(max_batch)
        self.polls = 0

    def poll(self, out, timeout=None):
        self.polls += 1
        if not self.done:
            return 0
        out[0] = (self.done.pop(0), 0, 0)
        return 1


def test_chunked_reads_land_in_order_and_each_is_handed_over_as_it_lands():
    """A get's READs go out in ~read_chunk-byte batches (at most max_outstanding a link), and
    on_done sees each batch's ops once it completed, in the order posted, before the next poll."""
    from rram.datapath.remote import _chunks

    tier = tier_on_two_links()
    for lk in tier.links:
        lk.endpoint = TrickleEndpoint(64)
    ls = locs(40)  # 64-byte READs: 20 a link (slabs alternate links), 4 a chunk of 256 bytes
    router, lkeys = tier.router(BASE)
    batches = router.route(False, ls, BASE + np.arange(40, dtype=np.uint64) * 4096, 40, lkeys)
    landed = []
    assert tier.run_routed(batches, on_done=lambda ops, a, b: landed.append(
        (sum(lk.endpoint.polls for lk in tier.links), ops[a:b]["local_addr"].copy())), chunked=True) == set()
    posted = [ep.posted for ep in (lk.endpoint for lk in tier.links)]
    assert [len(p) for p in posted] == [5, 5] and all(len(b) == 4 for p in posted for b in p)
    assert [polls for polls, _ in landed] == list(range(1, 11)), "each chunk opened before the next poll"
    flat = [b["local_addr"] for p in posted for b in p]
    assert all(np.array_equal(a, b) for (_, a), b in zip(landed, flat))
    # unchunked (writes, and endpoints without read_chunk): one batch a link, handed over whole
    landed.clear()
    for lk in tier.links:
        lk.endpoint.posted.clear()
    assert tier.run_routed(router.route(False, ls, BASE + np.arange(40, dtype=np.uint64) * 4096, 40, lkeys),
                           on_done=lambda ops, a, b: landed.append(b - a)) == set()
    assert landed == [20, 20]

    class Ep:
        read_chunk, max_outstanding = 1000, 4

    ops = np.zeros(64, dtype=[("length", np.uint32)])
    ops["length"] = 100
    assert _chunks(ops, 64, Ep()) == [(0, 16), (16, 32), (32, 48), (48, 64)], "no more runs than max_outstanding"
    assert _chunks(ops, 10, Ep()) == [(0, 10)] and _chunks(ops, 1, Ep()) == [(0, 1)]
    assert _chunks(ops, 11, Ep()) == [(0, 5), (5, 11)]
    ops["length"][:50] = 10  # 500 small bytes, then 14 pages of 100
    parts = _chunks(ops, 64, Ep())
    assert parts[0][0] == 0 and parts[-1][1] == 64 and all(a < b for a, b in parts)
    assert all(int(ops["length"][a:b].sum()) <= 1000 + 100 for a, b in parts)
    Ep.read_chunk = 0
    assert _chunks(ops, 64, Ep()) == [(0, 64)]

