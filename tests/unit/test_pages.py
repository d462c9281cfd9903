"""The realistic page mix used by tests, benchmarks and the demo."""
from __future__ import annotations

import zlib

import lz4.block
import numpy as np
import pytest

from rram.testing.pages import DEFAULT_MIX, KINDS, PAGE_SIZE, make_pages, page_checksums, page_kinds

N = 1000


@pytest.fixture(scope="module")
def mix():
    return make_pages(N, seed=11).reshape(N, PAGE_SIZE), page_kinds(N, seed=11)


def lz4_size(page: np.ndarray) -> int:
    return len(lz4.block.compress(page, store_size=False))


def test_same_seed_same_bytes_other_seed_other_bytes(mix):
    pages, _ = mix
    assert pages.dtype == np.uint8 and pages.size == N * PAGE_SIZE
    np.testing.assert_array_equal(make_pages(N, seed=11).reshape(N, PAGE_SIZE), pages)
    other = make_pages(N, seed=12).reshape(N, PAGE_SIZE)
    assert (other != pages).any(axis=1).mean() > 0.8


def test_counts_follow_the_mix(mix):
    _, kinds = mix
    counts = np.bincount(kinds, minlength=len(KINDS))
    for code, kind in enumerate(KINDS):
        assert counts[code] == round(DEFAULT_MIX[kind] * N), kind
    assert np.bincount(page_kinds(7, mix={"text": 1, "random": 1}), minlength=4).tolist() in ([0, 4, 0, 3], [0, 3, 0, 4])


def test_each_kind_looks_like_its_name(mix):
    pages, kinds = mix
    nonzero = pages.any(axis=1)
    assert not nonzero[kinds == KINDS.index("zero")].any()
    assert nonzero[kinds != KINDS.index("zero")].all()
    for kind, low, high in (("text", 1.7, 3.5), ("binary", 1.7, 4.0), ("random", 0.95, 1.0)):
        sample = pages[kinds == KINDS.index(kind)][:100]
        ratio = sample.size / sum(lz4_size(p) for p in sample)
        assert low <= ratio <= high, (kind, ratio)
    text = bytes(pages[kinds == KINDS.index("text")][0])
    assert text.decode("ascii").count(" ") > 200


def test_pages_differ_from_each_other(mix):
    pages, kinds = mix
    sums = page_checksums(pages, N)
    for kind in ("text", "binary", "random"):
        of_kind = sums[kinds == KINDS.index(kind)]
        assert len(np.unique(of_kind)) >= 0.98 * len(of_kind), kind  # a rare repeat is realistic


def test_overall_compression_ratio_is_realistic(mix):
    pages, kinds = mix
    stored = sum(lz4_size(p) for p, k in zip(pages, kinds) if k != KINDS.index("zero"))
    assert 1.8 <= pages.size / stored <= 3.2


def test_page_checksums_are_crc32_and_see_one_byte():
    pages = make_pages(5, seed=1)
    sums = page_checksums(pages, 5)
    assert sums.dtype == np.uint32
    assert sums[2] == zlib.crc32(bytes(pages[2 * PAGE_SIZE : 3 * PAGE_SIZE]))
    pages[3 * PAGE_SIZE + 1234] ^= 1
    changed = page_checksums(bytearray(pages), 5) != sums
    assert changed.tolist() == [False, False, False, True, False]
    with pytest.raises(ValueError, match="fewer than"):
        page_checksums(pages, 6)


@pytest.mark.parametrize("bad", [{"zero": 1, "video": 1}, {}, {"text": -1, "zero": 2}, {"text": 0}])
def test_bad_mix_is_rejected(bad):
    with pytest.raises(ValueError, match="mix"):
        make_pages(4, mix=bad)


def test_edge_counts():
    assert make_pages(0).size == 0
    assert make_pages(1, mix={"random": 1}).size == PAGE_SIZE
    with pytest.raises(ValueError, match="n must be"):
        make_pages(-1)
