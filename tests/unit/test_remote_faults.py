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
