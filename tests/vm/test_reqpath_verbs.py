"""The page store's C request path reading remote pages over verbs (soft-RoCE guest), real providers.

Two provider processes on rxe0, the requester's store on rxe1, two copies of every page and a
local budget far below the data, so most pages are remote.  Single-page reads through the C
request path (RequestPath.read, and the NBD server's C loop) must READ them over the link's QP
in C (``c_remote_reads`` rises, no read is declined), sealed and plain, every page by checksum.
Then a provider is stopped (one-sided READs go on: its kernel answers them) and killed (its QPs
go with it): C gives up on its READs at the read timeout, abandons them (QP to error, flush
drained) before staging is reused for the other link, and Python suspends it and reads the other
copy.  Every page written reads back.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import threading

import numpy as np
import pytest

import rram
from rram import config as C
from rram.frontends.nbd.backend import PageStoreBackend
from rram.testing.cluster import LocalCluster, free_port
from rram.testing.pages import PAGE_SIZE, make_pages

from ..unit.test_nbd_cpath import _client_loop, _settled, serve

_reqpath = pytest.importorskip("rram._ext._reqpath", reason="built without liblz4: no C request path")
DONE, LINK_FAILED, REMOTE_ERROR = (_reqpath.REQ[k] for k in ("done", "link_failed", "remote_error"))

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(300)]

N = 1200
OBJ = 1


@contextlib.contextmanager
def verbs_cluster(rdma_devices, tmp_path, **opts):
    """Two verbs providers and a config naming the requester "req" on the last device."""
    with LocalCluster(n_providers=2, capacity="128MiB", transport="verbs", slab_size="1MiB", replicas=2,
                      workdir=str(tmp_path), requester={"repatriate_rate": 0}, **opts) as c:
        cfg = C.load(c.config_path)
        cfg.nodes.append(C.NodeConfig(name="req", address="127.0.0.1", port=free_port(), roles=["requester"],
                                      rdma_device=rdma_devices[-1], gid_index=0))
        yield c, cfg


def open_store(cfg, seal: bool):
    # no keeper: the data path alone notices a failed provider here (C first), as under swap
    # between two heartbeats
    return rram.connect(cfg, name="req", local_budget=256 << 10, seal=seal, keeper=False)


def fill(store):
    pool = store.create_pool(persistent=True)
    data = make_pages(N, seed=23)
    store.put_many(pool, OBJ, np.arange(N), data)
    base = (pool << 56) | (OBJ << 32)
    remote = [i for i in range(N) if (store.map.get(base | i) >> 37) >= 4096]
    digests = [hashlib.sha256(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]).digest() for i in range(N)]
    return pool, base, remote, digests


def read(store, pool, base, i) -> tuple[bytes, int]:
    """One page through the C path, and through the Python path when C declines (as the NBD server)."""
    out = bytearray(PAGE_SIZE)
    rc = store.requests.read(base | i, out)
    if rc != DONE:
        out = bytearray(PAGE_SIZE)
        assert store.get(pool, OBJ, i, out) is not None
    return bytes(out), rc


@pytest.fixture(scope="module")
def cluster(rdma_devices, tmp_path_factory):
    with verbs_cluster(rdma_devices, tmp_path_factory.mktemp("reqpath-verbs")) as (c, cfg):
        yield c, cfg


@pytest.mark.parametrize("seal", [False, True], ids=["plain", "sealed"])
def test_remote_single_page_reads_are_served_in_c_over_verbs(cluster, seal):
    _c, cfg = cluster
    with open_store(cfg, seal) as store:
        assert store.transport == "verbs"
        assert all(lk.endpoint.c_core() is not None for lk in store.remote.links)
        pool, base, remote, digests = fill(store)
        assert len(remote) > N // 2
        before = store.stats()
        for i in range(N):
            got, rc = read(store, pool, base, i)
            assert rc == DONE, (i, rc, store.stats()["c_declined_by"])
            assert hashlib.sha256(got).digest() == digests[i], i
        stats = store.stats()
        assert stats["c_remote_reads"] - before.get("c_remote_reads", 0) == len(remote)
        declined = {k: v for k, v in stats["c_declined_by"].items() if k.startswith("read_") and v}
        assert not declined, declined
        assert set(stats["providers"].values()) == {"alive"}
        # a run of pages as one request: two chunks of 16, both links, local and remote pages
        idx = np.array(remote[:40], dtype=np.uint32)
        out = bytearray(len(idx) * PAGE_SIZE)
        assert store.requests.read_many(base, idx, out) == DONE
        for k, i in enumerate(idx.tolist()):
            assert hashlib.sha256(out[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]).digest() == digests[i], i
        if seal:
            assert stats["seal_failures"] == 0


def test_nbd_single_requests_read_remote_pages_in_c_over_verbs(cluster, tmp_path):
    """The NBD server's C loop, queue depth 1, writes then reads back every block (checked)."""
    _c, cfg = cluster
    with open_store(cfg, True) as store:
        backend = PageStoreBackend(store, store.create_pool(persistent=True), obj=1, size=256 * PAGE_SIZE)
        with serve(backend, tmp_path, "c", True) as (srv, path):
            errors: list = []
            _client_loop(path, 0, 250, 2, errors)
            assert not errors, errors[0]
            counters = _settled(srv)
        stats = store.stats()
        assert stats["remote_pages"] > 0 and stats["c_remote_reads"] >= stats["remote_pages"]
        declined = {k: v for k, v in stats["c_declined_by"].items() if k.startswith("read_") and v}
        assert not declined, declined
        assert counters["errors"] == 0 and counters["c_requests"] > 0


def test_a_stopped_then_killed_provider_mid_reads(rdma_devices, tmp_path, caplog):
    """SIGSTOP: one-sided READs are answered by the provider's kernel, so C goes on serving.
    SIGKILL: the kernel tears its windows and QPs down, so a READ gets no answer (C gives up at
    the read timeout: 0.5 s here, well before the QP's own retries run out, ~2 s) or, caught
    between the two, a remote access error; either way C abandons it (QP to error, flush
    drained), notes the link failed, and Python suspends it; the pages come from the other
    copy, in C again from then on."""
    with verbs_cluster(rdma_devices, tmp_path) as (c, cfg), open_store(cfg, True) as store:
        pool, base, remote, digests = fill(store)
        with store._lock:  # C takes the timeout when Python binds its routes again
            store.remote.read_timeout = 0.5
            store.remote.invalidate_routes()
        assert set(store.stats()["providers"].values()) == {"alive"}
        victim = store.remote.links[0]
        # readers in a second thread too: C requests race each other on the store's lock
        errors: list = []
        stop = threading.Event()

        def reader():
            try:
                while not stop.is_set():
                    for i in remote[::7]:
                        got, _rc = read(store, pool, base, i)
                        assert hashlib.sha256(got).digest() == digests[i], i
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        try:
            c.kill(victim.name, signal.SIGSTOP)
            try:
                for i in remote:
                    got, rc = read(store, pool, base, i)
                    assert rc == DONE and hashlib.sha256(got).digest() == digests[i], i
            finally:
                c.kill(victim.name, signal.SIGCONT)
            assert store.stats()["providers"][victim.name] == "alive"
            caplog.set_level(logging.WARNING, logger="rram.datapath.remote")
            c.kill(victim.name, signal.SIGKILL)
            codes = []
            for i in remote:
                got, rc = read(store, pool, base, i)
                assert hashlib.sha256(got).digest() == digests[i], i
                codes.append(rc)
        finally:
            stop.set()
            t.join(120)
        assert not errors, errors[0]
        stats = store.stats()
        assert stats["providers"][victim.name] == "suspended", stats["providers"]
        declined = stats["c_declined_by"]
        assert declined["read_link_failed"] + declined["read_remote_error"] >= 1, declined
        assert store.requests.nfailed == 0  # Python took the failure
        why = [r.getMessage() for r in caplog.records if f"provider {victim.name} suspended" in r.getMessage()]
        assert len(why) == 1 and "a read in C" in why[0], why
        counters = store.requests.counters()
        assert counters["remote_abandoned"] >= 1 and counters["remote_unsure"] == 0, counters
        assert not victim.endpoint.qp.outstanding  # C left nothing in flight on the dead QP
        last = max((k for k, rc in enumerate(codes) if rc != DONE), default=-1)
        assert set(codes[:last + 1]) <= {DONE, LINK_FAILED, REMOTE_ERROR}, codes
        assert len(codes) - last > len(remote) // 2  # from then on, C reads the other copy
        for i in range(N):  # every page, local and remote, once more
            got, _rc = read(store, pool, base, i)
            assert hashlib.sha256(got).digest() == digests[i], i
