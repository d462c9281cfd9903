"""Suspend and resume of a provider link over RDMA verbs (soft-RoCE guest), real providers.

The data path suspends a link whose batch times out: it deregisters our buffers from that
endpoint at once (a late READ response must not land in reused staging) and the keeper's
prober brings it back with ``recover()`` (a new QP, accepted through the control connection)
and the same leases.  Here the suspension is triggered directly (a verbs provider keeps
serving one-sided operations while its process is stopped, so SIGSTOP does not time out the
data path; network faults in the guest are a later step); everything after it is the real
mechanism: prober, recover, re-registration, resync of the copies that missed writes.
"""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

import rram
from rram import config as C
from rram.testing.cluster import LocalCluster, free_port
from rram.testing.pages import PAGE_SIZE, make_pages, page_checksums

pytestmark = [pytest.mark.vm, pytest.mark.slow]

N = 20_000


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def verify(store, pool, data, n):
    out = np.zeros(n * PAGE_SIZE, dtype=np.uint8)
    assert store.get_many(pool, 0, np.arange(n), out).all()
    bad = np.flatnonzero(page_checksums(out, n) != page_checksums(data, n))
    assert len(bad) == 0, f"{len(bad)} pages differ, first {bad[:5]}"


def test_a_suspended_verbs_link_resumes_with_its_leases_and_resyncs_only_what_it_missed(rdma_devices, tmp_path):
    with LocalCluster(n_providers=2, capacity="256MiB", transport="verbs", slab_size="4MiB", replicas=2,
                      workdir=str(tmp_path), heartbeat_interval=0.5, suspect_threshold=10.0, dead_threshold=30.0,
                      lease_grace=60.0, requester={"repatriate_rate": 0}) as c:
        cfg = C.load(c.config_path)
        cfg.nodes.append(C.NodeConfig(name="req", address="127.0.0.1", port=free_port(), roles=["requester"],
                                      rdma_device=rdma_devices[-1], gid_index=0))
        data = make_pages(N, seed=41)
        with rram.connect(cfg, name="req", local_budget=1 << 20) as store:
            pool = store.create_pool()
            store.put_many(pool, 0, np.arange(N // 2), data[: N // 2 * PAGE_SIZE])
            p1 = next(lk for lk in store.remote.links if lk.name == "p1")
            with store._lock:  # what a timed-out batch does
                store.remote.suspend(p1.index, "test: a batch timed out")
            # writes meanwhile go to p0 only; p1's copies of those slabs are stale
            store.put_many(pool, 0, np.arange(N // 2, N), data[N // 2 * PAGE_SIZE :])
            verify(store, pool, data, N)
            wait_for(lambda: store.stats()["providers"]["p1"] == "alive", 30, "p1 resumed by the prober")
            wait_for(lambda: store.stats()["degraded_slabs"] == 0, 120, "resync")
            s = store.stats()
            assert s["providers_resumed"] == 1 and s["providers_lost"] == 0
            # only slabs leased while p1 was out (one copy) get a second one; none of the old is copied
            assert s["slabs_rereplicated"] <= s["slabs_leased_degraded"]
            assert 0 < s["slabs_resynced"] <= s["remote_slabs"]
            c.kill("p0", signal.SIGKILL)  # p1's copies alone must now hold every page
            verify(store, pool, data, N)


@pytest.fixture
def lossy_link():
    """20 % loss and 50 ms delay on the requester's end of the veth pair (tc netem), removed after."""
    import shutil
    import subprocess

    if shutil.which("tc") is None:
        pytest.skip("tc is not installed")
    load = subprocess.run(["modprobe", "sch_netem"], capture_output=True, text=True)
    if load.returncode:
        pytest.skip(f"no netem in this kernel: {load.stderr.strip()}")
    subprocess.run(["tc", "qdisc", "add", "dev", "veth1", "root", "netem", "delay", "50ms", "loss", "20%"],
                   check=True)
    try:
        yield "veth1"
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "veth1", "root"], check=False)


def test_twenty_percent_loss_and_50ms_delay_on_the_link_lose_nothing(rdma_devices, tmp_path, lossy_link):
    """Every page written through a lossy, slow link reads back.  Reliable connections
    retransmit (go-back-N, a 67 ms timer): a batch of 32 pages takes about a second here, so
    the thresholds are wide; with one link for both providers there is no other copy to
    hedge to."""
    n = 400
    with LocalCluster(n_providers=2, capacity="128MiB", transport="verbs", slab_size="4MiB", replicas=2,
                      workdir=str(tmp_path), heartbeat_interval=1.0, suspect_threshold=120.0, dead_threshold=300.0,
                      requester={"repatriate_rate": 0, "remotify_batch": 32}) as c:
        cfg = C.load(c.config_path)
        cfg.nodes.append(C.NodeConfig(name="req", address="127.0.0.1", port=free_port(), roles=["requester"],
                                      rdma_device=rdma_devices[-1], gid_index=0))
        data = make_pages(n, seed=42)
        with rram.connect(cfg, name="req", local_budget=64 << 10) as store:
            pool = store.create_pool()
            for s in range(0, n, 100):
                store.put_many(pool, 0, np.arange(s, s + 100), data[s * PAGE_SIZE : (s + 100) * PAGE_SIZE])
            assert store.stats()["remote_pages"] > n // 2
            verify(store, pool, data, n)
            s = store.stats()
            assert s["slabs_lost"] == 0 and s["providers_lost"] == 0 and s["providers_suspended"] == 0
