"""Control plane figures with real provider processes (tcp on loopback).

    .venv/bin/pytest bench/test_control_bench.py --benchmark-only -p no:cacheprovider

* write path with r=2 against r=1 in the same run (issue goal: >= 0.6x);
* time to detect a SIGKILLed provider (heartbeat 0.2 s, suspect 0.5 s, dead 1.0 s; the kernel's
  connection reset usually tells us first);
* time to restore r copies (and per GiB re-replicated);
* time to drain a provider (and MB/s) while the requester keeps its pages readable.
Each timed value is that figure itself, median of 3 rounds, each on a fresh cluster filled
in pedantic's untimed setup; every page is read back and checked after each round.
"""
from __future__ import annotations

import contextlib
import signal
import time

import numpy as np
import pytest

from figures import scaled
from rram import PAGE_SIZE
from rram.cluster import open_store
from rram.testing.cluster import LocalCluster
from rram.testing.pages import make_pages, page_checksums

N = scaled(16384, 2048)
OBJECTS = scaled(8, 2)
ROUNDS = scaled(3, 1)
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
        benchmark.pedantic(store.put_many, args=(pool, 0, idx, pages), rounds=scaled(6, 2), warmup_rounds=1)
        assert store.stats()["remote_pages"] > N // 2
    benchmark.extra_info["pages_per_s"] = round(N / benchmark.stats.stats.median)


def _wait(pred, timeout=60.0):
    t = time.monotonic()
    while not pred():
        if time.monotonic() - t > timeout:
            raise AssertionError("timed out")
        time.sleep(0.002)


class Rounds:
    """One fresh cluster and filled store per round (built in pedantic's untimed setup), so
    that the timed function is exactly the event measured; every page is checked afterwards."""

    def __init__(self, pages, replicas: int, keeper: bool):
        self.pages, self.replicas, self.keeper = pages, replicas, keeper
        self.crcs = page_checksums(pages, N)
        self.stack = contextlib.ExitStack()

    def setup(self):
        self.stack.close()  # the previous round's cluster and store go first
        c = self.stack.enter_context(LocalCluster(n_providers=3, capacity="1GiB", slab_size="16MiB", verbose=False,
                                                  **TIMING))
        store = self.stack.enter_context(open_store(c.config, name="req", local_budget=1 << 20,
                                                    replicas=self.replicas, keeper=self.keeper))
        pool = store.create_pool()
        for obj in range(OBJECTS):  # OBJECTS x N pages of the mix: 0.5 GiB before compression
            store.put_many(pool, obj, np.arange(N), self.pages)
        return (c, store, pool), {}

    def verify(self, c, store, pool) -> None:
        out = np.empty(N * PAGE_SIZE, dtype=np.uint8)
        for obj in range(OBJECTS):
            assert store.get_many(pool, obj, np.arange(N), out).all()
            assert np.array_equal(page_checksums(out, N), self.crcs), f"object {obj} read back wrong"

    def close(self) -> None:
        self.stack.close()


def test_failure_detection(benchmark, pages):
    """Timed: from the SIGKILL of a provider to the store calling it dead."""
    rounds = Rounds(pages, replicas=2, keeper=True)

    def kill_until_dead(c, store, pool):
        c.kill("p1", signal.SIGKILL)
        _wait(lambda: store.stats()["providers"]["p1"] == "dead")

    def after(c, store, pool):
        _wait(lambda: store.stats()["degraded_slabs"] == 0, 300)
        rounds.verify(c, store, pool)

    try:
        benchmark.pedantic(kill_until_dead, setup=rounds.setup, teardown=after, rounds=ROUNDS)
    finally:
        rounds.close()
    # below 1: the connection reset told the store before the heartbeats' dead threshold did
    benchmark.extra_info.update(TIMING, over_dead_threshold=round(benchmark.stats.stats.median
                                                                  / TIMING["dead_threshold"], 2))


def test_rereplication(benchmark, pages):
    """Timed: from the SIGKILL of a provider to every slab having 2 live copies again."""
    rounds = Rounds(pages, replicas=2, keeper=True)
    copied: list[int] = []

    def kill_until_restored(c, store, pool):
        c.kill("p1", signal.SIGKILL)
        _wait(lambda: store.stats()["providers"]["p1"] == "dead")
        _wait(lambda: store.stats()["degraded_slabs"] == 0, 300)

    def after(c, store, pool):
        copied.append(store.stats()["bytes_rereplicated"])
        rounds.verify(c, store, pool)

    try:
        benchmark.pedantic(kill_until_restored, setup=rounds.setup, teardown=after, rounds=ROUNDS)
    finally:
        rounds.close()
    gib = float(np.median(copied)) / (1 << 30)
    benchmark.extra_info.update(rereplicated_gib=round(gib, 3),
                                restore_s_per_gib=round(benchmark.stats.stats.median / max(gib, 1e-9), 2))


def test_drain(benchmark, pages):
    """Timed: ``store.drain("p0")`` until every slab it had has moved; pages readable after."""
    rounds = Rounds(pages, replicas=1, keeper=True)  # the keeper runs the copying
    moved: list[int] = []

    def drain(c, store, pool):
        s = store.stats()
        before, bytes_before = s["slabs_moved"], s["bytes_moved"]
        n = store.drain("p0")
        _wait(lambda: store.stats()["slabs_moved"] - before >= n, 300)
        moved.append(store.stats()["bytes_moved"] - bytes_before)

    try:
        benchmark.pedantic(drain, setup=rounds.setup, teardown=rounds.verify, rounds=ROUNDS)
    finally:
        rounds.close()
    mb = float(np.median(moved)) / 1e6
    benchmark.extra_info.update(drained_mb=round(mb, 1), mb_per_s=round(mb / benchmark.stats.stats.median, 1))
