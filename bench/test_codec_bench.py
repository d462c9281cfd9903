"""Page codec throughput on the default page mix: native (liblz4, one C call a batch) against
the python-lz4 fallback (one Python call a page), side by side per group.

    taskset -c 1 .venv/bin/pytest bench/test_codec_bench.py --benchmark-columns=mean,stddev,rounds
"""
from __future__ import annotations

import numpy as np
import pytest

from rram.datapath import codec
from rram.testing.pages import make_pages

N = 4096  # pages a batch: 16 MiB, the order of the store's batches
ROUNDS = 15


@pytest.fixture(scope="module")
def pages():
    return make_pages(N, seed=2026)


@pytest.fixture(params=["native", "python"])
def impl(request):
    impls = codec.implementations()
    if request.param not in impls:
        pytest.skip(f"native codec unavailable: {codec.NATIVE_UNAVAILABLE}")
    return impls[request.param]


def _report(benchmark, sizes: np.ndarray) -> None:
    benchmark.extra_info["pages_per_s"] = round(N / benchmark.stats.stats.mean)
    benchmark.extra_info["MiB_per_s"] = round(N * codec.PAGE_SIZE / benchmark.stats.stats.mean / 2**20)
    benchmark.extra_info["ratio"] = round(N * codec.PAGE_SIZE / int(sizes.sum()), 3)


def test_compress(benchmark, impl, pages):
    benchmark.group = "codec compress (4096 pages, default mix)"
    dst, sizes = np.empty_like(pages), np.zeros(N, np.uint32)
    impl.compress_pages(pages, N, dst, sizes)  # fault the output in before timing
    benchmark.pedantic(impl.compress_pages, args=(pages, N, dst, sizes), rounds=ROUNDS, warmup_rounds=1)
    _report(benchmark, sizes)


def test_decompress(benchmark, impl, pages):
    benchmark.group = "codec decompress (4096 pages, default mix)"
    images, sizes = np.empty_like(pages), np.zeros(N, np.uint32)
    codec.compress_pages(pages, N, images, sizes)
    addrs = (images.ctypes.data + np.arange(N, dtype=np.uint64) * codec.PAGE_SIZE).astype(np.uint64)
    out = np.empty_like(pages)
    benchmark.pedantic(impl.decompress_pages, args=(addrs, sizes, N, out), rounds=ROUNDS, warmup_rounds=1)
    assert np.array_equal(out, pages)
    _report(benchmark, sizes)
