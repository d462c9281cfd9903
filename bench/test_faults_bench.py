"""Fault figures with real provider processes (tcp on loopback), each beside its baseline.

    .venv/bin/pytest bench/test_faults_bench.py --benchmark-only -p no:cacheprovider

Each timed value is the figure itself (bench/conftest.py ``figure``), median of 3 rounds, each
on a fresh cluster (three providers, r=2, suspect 0.6 s, dead 2 s) filled in pedantic's untimed
setup; every page is checked during and after each round.

* **stall**, s: the longest single operation (put_many or get_many of 500 pages, every page
  read checked) of a verifying workload, from the fault until every slab has r copies again:
  SIGSTOP of one provider (a hung node; goal: at most the suspect threshold) and SIGKILL (a
  crash), against no fault at all for 3 s (the baseline: the workload's longest operation anyway);
* **back to r copies**, s: from the end of a 1 s blackhole of one provider (fault proxy) until it
  serves again with every copy it missed brought up to date, against from the SIGKILL of that
  provider until its copies are re-replicated elsewhere (what every blip cost before resume):
  both are how long redundancy stays short once the fault is over (the network is back / the
  node is gone).  The SIGKILL's includes detection (``detect_s``): behind the proxy no
  connection reset tells the requester, the dead threshold (2 s) does;
* **reclaim**, MB/s: ``rram reclaim`` of 16 MiB (at most half) of the fullest provider's leased
  bytes while the requester idles, with half the pages ephemeral (one-copy slabs, dropped
  first) against every page persistent (slabs moved as in a drain).  The same bytes asked in
  both; at these sizes the heartbeat that carries the request (every 0.2 s) weighs in.

``RRAM_BENCH_QUICK=1``: fewer pages, one round.
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
from rram.control.reclaim import reclaim
from rram.testing.cluster import LocalCluster
from rram.testing.faultproxy import ProviderProxy
from rram.testing.pages import make_pages, page_checksums

from tests.integration.test_failures import put_range, wait_for
from tests.integration.test_faults import TIMING, Workload

N = scaled(20_000, 4_000)
ROUNDS = scaled(3, 1)
QUIET_S = 3.0  # the no-fault baseline's window: about as long as detection plus re-replication
RECLAIM = scaled(16 << 20, 4 << 20)  # bytes asked back


class Rounds:
    """A fresh cluster, store and filled pool(s) per round, built in pedantic's untimed setup;
    ``close`` (and the next setup) tears the previous round down."""

    def __init__(self, data, *, proxy: bool = False, second: str | None = None):
        """``second``: None, or a second pool with the same pages, "ephemeral" or "persistent"."""
        self.data, self.proxy, self.second = data, proxy, second
        self.sums = page_checksums(data, N)
        self.stack = contextlib.ExitStack()

    def open(self):
        self.stack.close()
        # the fault proxy reads and rewrites control frames: no TLS behind it (then for both of a pair)
        c = self.stack.enter_context(LocalCluster(n_providers=3, capacity="1GiB", slab_size="2MiB", replicas=2,
                                                  verbose=False, lease_grace=5.0, requester={"repatriate_rate": 0},
                                                  tls=not self.proxy, **TIMING))
        px = self.stack.enter_context(ProviderProxy(c.config, "p1")) if self.proxy else None
        store = self.stack.enter_context(open_store(px.config if px else c.config, name="req",
                                                    local_budget=2 << 20))
        pool = store.create_pool()
        put_range(store, pool, self.data, 0, N)
        other = None
        if self.second:
            other = store.create_pool(persistent=self.second == "persistent")
            put_range(store, other, self.data, 0, N)
        return c, px, store, pool, other

    def verify(self, store, pool, other) -> None:
        """Every persistent page reads back; an ephemeral one reads back or misses."""
        out = np.zeros(N * PAGE_SIZE, dtype=np.uint8)
        for p in (pool, other) if other is not None else (pool,):
            found = store.get_many(p, 0, np.arange(N), out)
            assert found.all() or p == other and self.second == "ephemeral"
            assert np.array_equal(page_checksums(out, N)[found], self.sums[found])

    def close(self) -> None:
        self.stack.close()


def _restored(store, timeout: float = 120) -> None:
    wait_for(lambda: store.stats()["degraded_slabs"] == 0, timeout, "every slab back to r copies")


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL", "none"])
@pytest.mark.benchmark(group="longest stall of a verifying workload after a provider fault, s")
def test_stall_after_a_provider_fault(benchmark, figure, fault):
    rounds = Rounds(make_pages(N, seed=31))

    def setup():
        c, _px, store, pool, other = rounds.open()
        w = rounds.stack.enter_context(Workload(store, pool, rounds.data, N))
        time.sleep(0.5)  # the workload is running
        return (c, store, w, pool, other), {}

    def stall(c, store, w, pool, other) -> float:
        w.longest = 0.0  # from the fault on (an operation in flight then is one the fault may stall)
        if fault == "none":
            time.sleep(QUIET_S)
        else:
            c.kill("p1", getattr(signal, fault))
            try:
                wait_for(lambda: store.stats()["providers"]["p1"] == "dead", 10, "p1 declared dead")
                _restored(store)
            finally:
                if fault == "SIGSTOP":
                    c.kill("p1", signal.SIGCONT)
        w.__exit__(None, None, None)
        assert w.error is None and w.bad == 0, (w.error, w.bad)
        rounds.verify(store, pool, other)
        return w.longest

    try:
        median = figure(stall, unit="s", rounds=ROUNDS, setup=setup)
    finally:
        rounds.close()
    benchmark.extra_info.update(TIMING, over_suspect_threshold=round(median / TIMING["suspect_threshold"], 2))


@pytest.mark.parametrize("fault", ["blip", "SIGKILL"])
@pytest.mark.benchmark(group="back to r copies after a provider fault, s")
def test_back_to_r_copies(benchmark, figure, fault):
    rounds = Rounds(make_pages(N, seed=32), proxy=True)
    copied, detect = [], []

    def setup():
        c, px, store, pool, other = rounds.open()
        w = rounds.stack.enter_context(Workload(store, pool, rounds.data, N))
        time.sleep(0.3)
        return (c, px, store, w, pool, other), {}

    def recover(c, px, store, w, pool, other) -> float:
        before = store.stats()
        if fault == "blip":
            px.blackhole(1.0)
            start = time.monotonic() + 1.0  # the network is back
            wait_for(lambda: store.stats()["providers_resumed"] >= 1, 10, "p1 resumed")
        else:
            c.kill("p1", signal.SIGKILL)
            start = time.monotonic()  # the node is gone
            wait_for(lambda: store.stats()["providers"]["p1"] == "dead", 10, "p1 declared dead")
            detect.append(time.monotonic() - start)
        _restored(store)
        took = time.monotonic() - start
        w.__exit__(None, None, None)
        assert w.error is None and w.bad == 0, (w.error, w.bad)
        s = store.stats()
        if fault == "blip":  # resumed, not re-replicated (but slabs leased with one copy during the blip)
            assert s["providers_lost"] == 0 and s["slabs_rereplicated"] <= s["slabs_leased_degraded"], s
        copied.append(sum(s[k] - before[k] for k in ("bytes_resynced", "bytes_rereplicated")))
        rounds.verify(store, pool, other)
        return took

    try:
        figure(recover, unit="s", rounds=ROUNDS, setup=setup)
    finally:
        rounds.close()
    benchmark.extra_info.update(mb_copied=round(float(np.median(copied)) / 1e6, 1))
    if detect:
        benchmark.extra_info.update(detect_s=round(float(np.median(detect)), 3))


def _holding_ephemeral(store) -> set[str]:
    """The providers that hold the one copy of some ephemeral slab of ``store``."""
    remote = store.remote
    with store._lock:
        return {remote.links[rep.link].name for vs in remote.slabs.values() if vs.ephemeral
                for rep in vs.replicas if rep is not None}


@pytest.mark.parametrize("mix", ["half-ephemeral", "persistent"])
@pytest.mark.benchmark(group="reclaim of a provider's leased bytes, MB/s")
def test_reclaim_rate(benchmark, figure, mix):
    rounds = Rounds(make_pages(N, seed=33), second="ephemeral" if mix == "half-ephemeral" else "persistent")
    freed = []

    def setup():
        c, _px, store, pool, other = rounds.open()
        used = {name: st["used"] for name, st in c.provider_stats().items()}
        if mix == "half-ephemeral":  # ephemeral slabs have one copy: the most-used provider may hold none
            used = {name: u for name, u in used.items() if name in _holding_ephemeral(store)}
        victim = max(used, key=used.get)
        return (c, store, victim, used[victim], pool, other), {}

    def reclaim_half(c, store, victim, used, pool, other) -> float:
        t0 = time.monotonic()
        ask = min(RECLAIM, used // 2)
        stats = reclaim(c.config, victim, ask, timeout=300, poll=0.02)
        seconds = time.monotonic() - t0
        mb = (used - stats["used"]) / 1e6
        assert mb >= ask / 1e6
        assert (store.stats()["ephemeral_dropped"] > 0) == (mix == "half-ephemeral")
        freed.append(mb)
        rounds.verify(store, pool, other)
        return mb / seconds

    try:
        figure(reclaim_half, unit="MB/s", rounds=ROUNDS, setup=setup)
    finally:
        rounds.close()
    benchmark.extra_info.update(freed_mb=round(float(np.median(freed)), 1))
