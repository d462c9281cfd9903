"""The page store over RDMA verbs with real provider processes (rram provider, LocalCluster).

Providers take the first active device (rxe0 in the VM); the requester is pinned to the last
one (rxe1) through its own node entry, so every remote page crosses the veth pair.  A local
budget of 4 MiB against ~180 MB of compressed data makes nearly every page remote.
"""
from __future__ import annotations

import numpy as np
import pytest

import rram
from rram import config as C
from rram.testing.cluster import LocalCluster, free_port
from rram.testing.pages import PAGE_SIZE, make_pages, page_checksums

pytestmark = [pytest.mark.vm, pytest.mark.slow]

N_PAGES = 100_000
CHUNK = 10_000  # pages verified per get_many: bounds the read buffer at 40 MB
LOCAL_BUDGET = 4 << 20


@pytest.fixture(scope="module")
def cluster(rdma_devices):
    # the keeper runs as rram.connect starts it, with thresholds for an emulated CPU and no
    # repatriation, so that page counts only move when the test moves them
    with LocalCluster(n_providers=2, capacity="256MiB", transport="verbs", slab_size="16MiB",
                      heartbeat_interval=1.0, suspect_threshold=20.0, dead_threshold=60.0,
                      requester={"repatriate_rate": 0}) as c:
        yield c


@pytest.fixture(scope="module")
def store(cluster, rdma_devices):
    cfg = C.load(cluster.config_path)
    cfg.nodes.append(C.NodeConfig(name="req", address="127.0.0.1", port=free_port(), roles=["requester"],
                                  rdma_device=rdma_devices[-1], gid_index=0))
    s = rram.connect(cfg, name="req", local_budget=LOCAL_BUDGET)
    yield s
    s.close()


@pytest.fixture(scope="module")
def data():
    pages = make_pages(N_PAGES, seed=7)
    return pages, page_checksums(pages, N_PAGES)


def verify(store, pool, obj, indexes, expected_crc) -> np.ndarray:
    """Read ``indexes`` back in chunks; assert each page's CRC; returns the found mask."""
    indexes = np.asarray(indexes, dtype=np.uint64)
    found = np.zeros(len(indexes), dtype=bool)
    buf = np.empty(CHUNK * PAGE_SIZE, dtype=np.uint8)
    for start in range(0, len(indexes), CHUNK):
        part = indexes[start : start + CHUNK]
        out = buf[: len(part) * PAGE_SIZE]
        found[start : start + len(part)] = store.get_many(pool, obj, part, out)
        got = page_checksums(out, len(part))
        bad = np.flatnonzero(got != expected_crc[start : start + len(part)])
        assert not len(bad), f"{len(bad)} pages differ, first index {int(part[bad[0]])}"
    return found


def leased_at_providers(store) -> int:
    """Bytes the provider processes say this requester holds (their own accounting)."""
    return sum(link.client.stats()["used"] for link in store.remote.links)


def test_providers_serve_over_verbs(cluster, store, rdma_devices):
    assert store.transport == "verbs"
    assert set(store.stats()["providers"].values()) == {"alive"}
    for link in store.remote.links:
        s = link.client.stats()
        assert s["transport"] == "verbs", s
        assert s["transport_stats"]["device"] in rdma_devices
    assert store.remote.links[0].endpoint.device.name == rdma_devices[-1]


def test_100k_pages_go_remote_and_come_back(store, data):
    pages, crc = data
    pool = store.create_pool(persistent=True)
    idx = np.arange(N_PAGES, dtype=np.uint64)
    store.put_many(pool, 1, idx, pages)
    st = store.stats()
    nonzero = int(st["pages"] - st["zero_pages"])
    assert st["pages"] == N_PAGES
    assert st["remote_pages"] >= 0.95 * nonzero, st
    assert st["local_compressed_bytes"] <= LOCAL_BUDGET < st["remote_compressed_bytes"] // 20
    assert st["remote_slabs"] >= 2
    assert leased_at_providers(store) == st["remote_leased_bytes"]

    assert verify(store, pool, 1, idx, crc).all()
    # the single-page latency path, on pages that are certainly remote now
    for i in np.random.default_rng(3).choice(N_PAGES, 64, replace=False).tolist():
        assert int(page_checksums(store.get(pool, 1, i), 1)[0]) == crc[i]
    assert store.stats()["remote_gets"] >= 0.95 * nonzero


def test_invalidate_and_reuse(store, data):
    pages, crc = data
    pool = store.create_pool(persistent=True)
    n = 24_000
    idx = np.arange(n, dtype=np.uint64)
    store.put_many(pool, 2, idx, pages[: n * PAGE_SIZE])
    before = store.stats()

    gone = idx[::2]
    assert store.invalidate_pages(pool, 2, gone) == len(gone)
    after = store.stats()
    assert after["pages"] == before["pages"] - len(gone)
    assert after["remote_pages"] < before["remote_pages"] - 0.4 * len(gone)
    found = store.get_many(pool, 2, gone[:1000], np.empty(1000 * PAGE_SIZE, dtype=np.uint8))
    assert not found.any()
    assert store.get(pool, 2, int(gone[0])) is None

    # reuse: the freed slots take other pages (page i+1 under key i), old neighbours unharmed
    src = pages.reshape(N_PAGES, PAGE_SIZE)[gone + 1].reshape(-1)
    store.put_many(pool, 2, gone, src)
    expected = crc[:n].copy()
    expected[::2] = crc[1 : n + 1 : 2]
    assert verify(store, pool, 2, idx, expected).all()

    # overwrite in place, then drop the whole pool
    store.put_many(pool, 2, idx[:256], pages[-256 * PAGE_SIZE :])
    assert verify(store, pool, 2, idx[:256], crc[-256:]).all()
    full = store.stats()
    assert store.invalidate_pool(pool) == n
    dropped = store.stats()
    assert dropped["pages"] == full["pages"] - n
    assert dropped["remote_compressed_bytes"] < full["remote_compressed_bytes"] - 20 * PAGE_SIZE * 256
    assert dropped["remote_leased_bytes"] <= full["remote_leased_bytes"]
    assert leased_at_providers(store) == dropped["remote_leased_bytes"]

    # the freed remote space takes the next pool: at most one more slab is leased for it
    pool3 = store.create_pool(persistent=True)
    store.put_many(pool3, 3, idx, pages[: n * PAGE_SIZE])
    again = store.stats()
    assert again["remote_leased_bytes"] <= full["remote_leased_bytes"] + store.remote.slab_size, (full, again)
    assert verify(store, pool3, 3, idx, crc[:n]).all()
