"""Page store end to end over tcp to real provider processes, each figure beside its baseline.

    .venv/bin/pytest bench/test_store_bench.py --benchmark-only -p no:cacheprovider
    RRAM_BENCH_PIN=split|same|none  (default split: requester on CPU 0, providers on CPU 1)

* put_many / get_many throughput (pages/s, the demo's page mix, pages remote) against the codec
  alone on the same pages (what LZ4 allows on this core): the ratio is the store's overhead.
* get latency of a remote page (store.get) against a raw Python socket request/response on the
  same loopback that moves the same bytes (a 32 B request, a reply of each page's compressed
  size), once with both ends sleeping in recv and once with both polling first as rram's
  requester and provider do (tcp.DEFAULT_SPIN_US, DEFAULT_PROVIDER_SPIN_US): the goal (<= 1.5x)
  is against the spinning one.  The
  store's get must go remote every time (asserted), and the last page read is checked.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from figures import bench_cpus, pinned_tcp_cluster, scaled
from rram import PAGE_SIZE
from rram.cluster import open_store
from rram.datapath import codec
from rram.datapath import keys as K
from rram.datapath import slab as L
from rram.testing import rawsocket
from rram.testing.pages import make_pages
from rram.transport import tcp

N = scaled(16384, 4096)
LOCAL_BUDGET = scaled(4 << 20, 1 << 20)  # most pages remote either way
ROUNDS = scaled(8, 2)
LAT_ROUNDS = scaled(3000, 200)
LAT_PAGES = 500
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    with pinned_tcp_cluster() as (cluster, pin), \
            open_store(cluster.config, name="bench", local_budget=LOCAL_BUDGET, keeper=False) as store:
        pool = store.create_pool()
        data = make_pages(N, seed=3)
        store.put_many(pool, 0, np.arange(N), data)
        yield store, pool, data, pin


def _pps(benchmark, pages, pin):
    benchmark.extra_info["pages_per_s"] = round(pages / benchmark.stats.stats.median)
    benchmark.extra_info["pinning"] = pin


@pytest.mark.benchmark(group="store put, pages/s")
def test_put_many_remote(benchmark, setup):
    store, pool, data, pin = setup
    idx = np.arange(N)
    benchmark.pedantic(store.put_many, args=(pool, 0, idx, data), rounds=ROUNDS, warmup_rounds=1)
    _pps(benchmark, N, pin)
    assert store.stats()["remote_pages"] > N // 2


@pytest.mark.benchmark(group="store put, pages/s")
def test_put_baseline_codec_only(benchmark, setup):
    _, _, data, pin = setup
    dst = np.zeros_like(data)
    sizes = np.zeros(N, dtype=np.uint32)
    benchmark.pedantic(codec.compress_pages, args=(data, N, dst, sizes), rounds=ROUNDS, warmup_rounds=1)
    _pps(benchmark, N, pin)


@pytest.mark.benchmark(group="store get, pages/s")
def test_get_many_remote(benchmark, setup):
    store, pool, data, pin = setup
    out = np.zeros_like(data)
    benchmark.pedantic(store.get_many, args=(pool, 0, np.arange(N), out), rounds=ROUNDS, warmup_rounds=1)
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
    benchmark.pedantic(codec.decompress_pages, args=(srcs, sizes, N, out), rounds=ROUNDS, warmup_rounds=1)
    _pps(benchmark, N, pin)


@pytest.fixture(scope="module")
def remote_reads(setup):
    """Remote pages to read one at a time, and the compressed bytes each READ moves."""
    store, pool = setup[0], setup[1]
    idx = list(range(0, N, 7))[:LAT_PAGES]
    locs = [store.map.get(K.pack(pool, 0, i)) for i in idx]
    remote = [(i, loc) for i, loc in zip(idx, locs) if L.is_remote(loc)]
    assert remote, "no remote page to read"
    return [i for i, _ in remote], [L.loc_size(loc) for _, loc in remote]


def _latency(benchmark, name: str, fn, pin: str) -> None:
    benchmark.pedantic(fn, rounds=LAT_ROUNDS, warmup_rounds=100)
    _medians[name] = benchmark.stats.stats.median
    benchmark.extra_info["pinning"] = pin
    if name == "store" and {"raw-sleeping", "raw-spinning"} <= _medians.keys():
        for raw in ("raw-sleeping", "raw-spinning"):
            benchmark.extra_info[f"p50_over_{raw}"] = round(_medians["store"] / _medians[raw], 2)


@pytest.mark.benchmark(group="get latency of a remote page")
@pytest.mark.parametrize("spin", ["sleeping", "spinning"])
def test_get_latency_baseline_raw_socket(benchmark, setup, remote_reads, spin):
    """A raw socket moving the same bytes as the store's READs (each page's compressed size),
    both ends waiting as rram's requester and provider do (spinning) or in a blocking recv
    (sleeping)."""
    _, sizes = remote_reads
    spinning = spin == "spinning"
    proc, port = rawsocket.start(bench_cpus("provider"), spin_us=tcp.DEFAULT_PROVIDER_SPIN_US if spinning else 0)
    rtt = rawsocket.RoundTrip(port, spin_us=tcp.DEFAULT_SPIN_US if spinning else 0)
    it = itertools.cycle(sizes)
    try:
        _latency(benchmark, f"raw-{spin}", lambda: rtt(next(it)), setup[3])
        benchmark.extra_info["mean_reply_bytes"] = round(sum(sizes) / len(sizes))
    finally:
        rtt.close()
        rawsocket.stop(proc)


@pytest.mark.benchmark(group="get latency of a remote page")
def test_get_latency_remote_page(benchmark, setup, remote_reads):
    store, pool, data, pin = setup
    pages, sizes = remote_reads
    buf = bytearray(PAGE_SIZE)
    it = itertools.cycle(pages)
    before = store.stats()["remote_gets"]
    _latency(benchmark, "store", lambda: store.get(pool, 0, next(it), buf), pin)
    assert store.stats()["remote_gets"] - before == LAT_ROUNDS + 100, "a get did not go remote"
    last = pages[(LAT_ROUNDS + 100 - 1) % len(pages)]
    assert bytes(buf) == data[last * PAGE_SIZE:(last + 1) * PAGE_SIZE].tobytes()
    benchmark.extra_info["mean_read_bytes"] = round(sum(sizes) / len(sizes))
