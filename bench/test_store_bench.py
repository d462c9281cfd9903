"""Page store end to end over tcp to real provider processes, each figure beside its baseline.

    .venv/bin/pytest bench/test_store_bench.py --benchmark-only -p no:cacheprovider
    RRAM_BENCH_PIN=split|same|none  (default split: requester on CPU 0, providers on CPU 1)

* put_many / get_many throughput (pages/s, the demo's page mix, pages remote) against the codec
  alone on the same pages (what LZ4 allows on this core): the ratio is the store's overhead.
* 4 KiB get latency of a remote page (store.get) against a raw Python socket request/response
  (32 B request, 4 KiB reply) on the same loopback: the ratio is the issue's goal (<= 1.5x).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from rram import PAGE_SIZE
from rram.datapath import codec
from rram.cluster import open_store
from rram.datapath import keys as K
from rram.datapath import slab as L
from rram.testing import rawsocket
from rram.testing.cluster import LocalCluster
from rram.testing.pages import make_pages

N = 16384


def _cpus(role):
    mode = os.environ.get("RRAM_BENCH_PIN", "split")
    if mode == "none" or (os.cpu_count() or 1) < 2 and mode == "split":
        return None
    if mode == "same":
        return {0}
    return {0} if role == "requester" else {1}


def _pin_process(pid: int, cpus) -> None:
    """Pin every thread of ``pid`` (threads it starts later inherit the mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


@pytest.fixture(scope="module")
def setup():
    req_cpus = _cpus("requester")
    old = os.sched_getaffinity(0)
    with LocalCluster(n_providers=2, capacity="1GiB", transport="tcp", slab_size="64MiB", verbose=False) as cluster:
        prov_cpus = _cpus("provider")
        if prov_cpus:
            for proc in cluster.procs.values():
                _pin_process(proc.pid, prov_cpus)
        if req_cpus:
            os.sched_setaffinity(0, req_cpus)
        try:
            with open_store(cluster.config, name="bench", local_budget=4 << 20, keeper=False) as store:
                pool = store.create_pool()
                data = make_pages(N, seed=3)
                store.put_many(pool, 0, np.arange(N), data)
                yield store, pool, data, f"requester={sorted(req_cpus or [])} providers={sorted(prov_cpus or [])}"
        finally:
            os.sched_setaffinity(0, old)


def _pps(benchmark, pages, pin):
    benchmark.extra_info["pages_per_s"] = round(pages / benchmark.stats.stats.median)
    benchmark.extra_info["pinning"] = pin


@pytest.mark.benchmark(group="store put, pages/s")
def test_put_many_remote(benchmark, setup):
    store, pool, data, pin = setup
    idx = np.arange(N)
    benchmark.pedantic(store.put_many, args=(pool, 0, idx, data), rounds=8, warmup_rounds=1)
    _pps(benchmark, N, pin)
    assert store.stats()["remote_pages"] > N // 2


@pytest.mark.benchmark(group="store put, pages/s")
def test_put_baseline_codec_only(benchmark, setup):
    _, _, data, pin = setup
    dst = np.zeros_like(data)
    sizes = np.zeros(N, dtype=np.uint32)
    benchmark.pedantic(codec.compress_pages, args=(data, N, dst, sizes), rounds=8, warmup_rounds=1)
    _pps(benchmark, N, pin)


@pytest.mark.benchmark(group="store get, pages/s")
def test_get_many_remote(benchmark, setup):
    store, pool, data, pin = setup
    out = np.zeros_like(data)
    benchmark.pedantic(store.get_many, args=(pool, 0, np.arange(N), out), rounds=8, warmup_rounds=1)
    assert np.array_equal(out, data)
    _pps(benchmark, N, pin)


@pytest.mark.benchmark(group="store get, pages/s")
def test_get_baseline_codec_only(benchmark, setup):
    _, _, data, pin = setup
    comp = np.zeros_like(data)
    sizes = np.zeros(N, dtype=np.uint32)
    codec.compress_pages(data, N, comp, sizes)
    srcs = comp.ctypes.data + np.arange(N, dtype=np.uint64) * PAGE_SIZE
    out = np.zeros_like(data)
    benchmark.pedantic(codec.decompress_pages, args=(srcs, sizes, N, out), rounds=8, warmup_rounds=1)
    _pps(benchmark, N, pin)


@pytest.mark.benchmark(group="4 KiB get latency")
def test_get_latency_remote_page(benchmark, setup):
    store, pool, data, pin = setup
    remote = [i for i in range(0, N, 7) if L.is_remote(store.map.get(K.pack(pool, 0, i)))][:500]
    assert remote, "no remote page to read"
    buf = bytearray(PAGE_SIZE)
    it = iter(remote * 10000)
    benchmark.pedantic(lambda: store.get(pool, 0, next(it), buf), rounds=3000, warmup_rounds=100)
    benchmark.extra_info["pinning"] = pin


@pytest.mark.benchmark(group="4 KiB get latency")
def test_get_latency_baseline_raw_socket(benchmark, setup):
    pin = setup[3]
    proc, port = rawsocket.start(_cpus("provider"))
    rtt = rawsocket.RoundTrip(port)
    try:
        benchmark.pedantic(rtt, rounds=3000, warmup_rounds=100)
        benchmark.extra_info["pinning"] = pin
    finally:
        rtt.close()
        rawsocket.stop(proc)
