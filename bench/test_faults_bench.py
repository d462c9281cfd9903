"""Fault figures with real provider processes (tcp on loopback).

    .venv/bin/pytest bench/test_faults_bench.py --benchmark-only -p no:cacheprovider

* the longest stall of a verifying workload after SIGSTOP (a hung node) against SIGKILL (a
  crash) of one provider (r=2, suspect 0.6 s, dead 2 s): a hung node should cost at most
  the suspect threshold, a crash about nothing;
* time to resume after a one-second blackhole of one provider (fault proxy): from the end of
  the blip until the provider serves again with every copy it missed brought up to date;
* reclaim MB/s: ``rram reclaim`` of half a provider's leased bytes (ephemeral pages go first).

``RRAM_BENCH_PAGES`` scales the working set (default 30 000 pages).
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from rram.cluster import open_store
from rram.testing.cluster import LocalCluster
from rram.testing.faultproxy import ProviderProxy
from rram.testing.pages import make_pages

from tests.integration.test_failures import put_range, wait_for
from tests.integration.test_faults import TIMING, Workload

N = int(os.environ.get("RRAM_BENCH_PAGES", "30000"))


@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
@pytest.mark.benchmark(group="longest stall after a provider fault, s")
def test_stall_after_a_provider_fault(benchmark, sig):
    data = make_pages(N, seed=31)
    results = {}

    def round_():
        with LocalCluster(n_providers=3, capacity="1GiB", slab_size="8MiB", replicas=2, verbose=False,
                          lease_grace=5.0, **TIMING) as c, \
                open_store(c.config, name="req", local_budget=2 << 20) as store:
            pool = store.create_pool()
            put_range(store, pool, data, 0, N)
            with Workload(store, pool, data, N) as w:
                time.sleep(0.5)
                before = w.longest
                c.kill("p1", getattr(signal, sig))
                try:
                    wait_for(lambda: store.stats()["providers"]["p1"] == "dead", 10, "p1 dead")
                    wait_for(lambda: store.stats()["degraded_slabs"] == 0, 120, "re-replication")
                finally:
                    if sig == "SIGSTOP":
                        c.kill("p1", signal.SIGCONT)
            assert w.error is None and w.bad == 0
            results.update(longest_s=w.longest, before_s=before, ops=w.ops)

    benchmark.pedantic(round_, rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 3) for k, v in results.items()})


@pytest.mark.benchmark(group="resume after a 1 s blackhole, s")
def test_resume_after_a_blip(benchmark):
    data = make_pages(N, seed=32)
    results = {}

    def round_():
        with LocalCluster(n_providers=2, capacity="1GiB", slab_size="8MiB", replicas=2, verbose=False,
                          lease_grace=5.0, tls=False, **TIMING) as c, ProviderProxy(c.config, "p1") as px, \
                open_store(px.config, name="req", local_budget=2 << 20) as store:
            pool = store.create_pool()
            put_range(store, pool, data, 0, N)
            with Workload(store, pool, data, N) as w:
                time.sleep(0.3)
                px.blackhole(1.0)
                healed = time.monotonic() + 1.0
                wait_for(lambda: store.stats()["providers_resumed"] >= 1, 10, "p1 resumed")
                wait_for(lambda: store.stats()["degraded_slabs"] == 0, 60, "resync")
                results["resume_s"] = time.monotonic() - healed
            s = store.stats()
            assert w.error is None and w.bad == 0 and s["slabs_rereplicated"] <= s["slabs_leased_degraded"]
            results.update(slabs_resynced=s["slabs_resynced"], mb_resynced=s["bytes_resynced"] / 1e6,
                           longest_stall_s=w.longest)

    benchmark.pedantic(round_, rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 3) for k, v in results.items()})


@pytest.mark.benchmark(group="reclaim, MB/s")
def test_reclaim_rate(benchmark):
    """``rram reclaim`` of half of a provider's leased bytes while the requester idles:
    ephemeral pages dropped first (half the pages here), then slabs moved as in a drain."""
    from rram.control.reclaim import reclaim

    data = make_pages(N, seed=33)
    results = {}

    def round_():
        with LocalCluster(n_providers=3, capacity="1GiB", slab_size="8MiB", replicas=2, verbose=False,
                          requester={"repatriate_rate": 0}, **TIMING) as c, \
                open_store(c.config, name="req", local_budget=2 << 20) as store:
            pool, eph = store.create_pool(), store.create_pool(persistent=False)
            put_range(store, pool, data, 0, N)
            put_range(store, eph, data, 0, N)
            used = {name: st["used"] for name, st in c.provider_stats().items()}
            victim = max(used, key=used.get)
            t0 = time.monotonic()
            stats = reclaim(c.config, victim, used[victim] // 2, timeout=300)
            results.update(seconds=time.monotonic() - t0, freed_mb=(used[victim] - stats["used"]) / 1e6,
                           ephemeral_dropped=store.stats()["ephemeral_dropped"])

    benchmark.pedantic(round_, rounds=1, iterations=1)
    benchmark.extra_info.update(freed_mb=round(results["freed_mb"], 1),
                                mb_per_s=round(results["freed_mb"] / results["seconds"], 1),
                                ephemeral_dropped=results["ephemeral_dropped"])
