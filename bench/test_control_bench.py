"""Control plane figures with real provider processes (tcp on loopback).

    .venv/bin/pytest bench/test_control_bench.py --benchmark-only -p no:cacheprovider

* write path with r=2 against r=1 in the same run (issue goal: >= 0.6x);
* time to detect a SIGKILLed provider (heartbeat 0.2 s, suspect 0.5 s, dead 1.0 s; the kernel's
  connection reset usually tells us first);
* time to restore r copies, per GiB re-replicated;
* drain rate in MB/s while the requester keeps its pages readable.
"""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from rram import PAGE_SIZE
from rram.cluster import open_store
from rram.testing.cluster import LocalCluster
from rram.testing.pages import make_pages

N = 16384
TIMING = {"heartbeat_interval": 0.2, "suspect_threshold": 0.5, "dead_threshold": 1.0}


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_providers=3, capacity="1GiB", slab_size="16MiB", verbose=False, **TIMING) as c:
        yield c


@pytest.fixture(scope="module")
def pages():
    return make_pages(N, seed=4)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.benchmark(group="write path by replicas, pages/s")
def test_put_many_by_replicas(benchmark, cluster, pages, replicas):
    with open_store(cluster.config, name=f"r{replicas}", local_budget=1 << 20, replicas=replicas,
                    keeper=False) as store:
        pool = store.create_pool()
        idx = np.arange(N)
        benchmark.pedantic(store.put_many, args=(pool, 0, idx, pages), rounds=6, warmup_rounds=1)
        assert store.stats()["remote_pages"] > N // 2
    benchmark.extra_info["pages_per_s"] = round(N / benchmark.stats.stats.median)


def _wait(pred, timeout=60.0):
    t = time.monotonic()
    while not pred():
        if time.monotonic() - t > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)
    return time.monotonic() - t


def test_failure_detection_and_rereplication(benchmark, pages):
    """One round: fill, SIGKILL a provider, time detection and the restore of 2 copies."""
    results = {}

    def round_():
        with LocalCluster(n_providers=3, capacity="1GiB", slab_size="16MiB", verbose=False, **TIMING) as c:
            with open_store(c.config, name="req", local_budget=1 << 20, replicas=2) as store:
                pool = store.create_pool()
                for rep in range(8):  # 8 objects x 16k pages: ~0.5 GiB before compression
                    store.put_many(pool, rep, np.arange(N), pages)
                c.kill("p1", signal.SIGKILL)
                t0 = time.monotonic()
                results["detect_s"] = _wait(lambda: store.stats()["providers"]["p1"] == "dead")
                _wait(lambda: store.stats()["degraded_slabs"] == 0, 300)
                s = store.stats()
                results["restore_s"] = time.monotonic() - t0
                results["bytes"] = s["bytes_rereplicated"]

    benchmark.pedantic(round_, rounds=1, iterations=1)
    gib = results["bytes"] / (1 << 30)
    benchmark.extra_info.update(detect_s=round(results["detect_s"], 3), restore_s=round(results["restore_s"], 2),
                                rereplicated_gib=round(gib, 3),
                                restore_s_per_gib=round(results["restore_s"] / max(gib, 1e-9), 2))


def test_drain_rate(benchmark, pages):
    results = {}

    def round_():
        with LocalCluster(n_providers=3, capacity="1GiB", slab_size="16MiB", verbose=False, **TIMING) as c:
            with open_store(c.config, name="req", local_budget=1 << 20, replicas=1) as store:
                pool = store.create_pool()
                for rep in range(8):
                    store.put_many(pool, rep, np.arange(N), pages)
                before = store.stats()["slabs_moved"]
                t0 = time.monotonic()
                n = store.drain("p0")
                _wait(lambda: store.stats()["slabs_moved"] - before >= n, 300)
                results["seconds"] = time.monotonic() - t0
                results["bytes"] = store.stats()["bytes_moved"]
                out = np.zeros(N * PAGE_SIZE, dtype=np.uint8)
                assert store.get_many(pool, 7, np.arange(N), out).all()

    benchmark.pedantic(round_, rounds=1, iterations=1)
    benchmark.extra_info.update(drained_mb=round(results["bytes"] / 1e6, 1),
                                mb_per_s=round(results["bytes"] / 1e6 / results["seconds"], 1))
