"""The page codec: every test runs against the native and the pure-Python implementation."""
from __future__ import annotations

import threading
import time

import lz4
import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rram import errors
from rram.datapath import codec
from rram.testing.pages import KINDS, make_pages, page_checksums, page_kinds

P = codec.PAGE_SIZE
NAMES = ("native", "python")


def _get(name: str):
    impls = codec.implementations()
    if name not in impls:
        pytest.skip(f"{name} codec unavailable: {codec.NATIVE_UNAVAILABLE}")
    return impls[name]


@pytest.fixture(params=NAMES)
def impl(request):
    return _get(request.param)


@pytest.fixture(scope="module")
def mix():
    n = 400
    return n, make_pages(n, seed=7), page_kinds(n, seed=7)


def compress(impl, pages: np.ndarray, n: int):
    dst = np.full(n * P, 0xAA, dtype=np.uint8)
    sizes = np.zeros(n, dtype=np.uint32)
    total = impl.compress_pages(pages, n, dst, sizes)
    return dst, sizes, total


def addresses(buf: np.ndarray, n: int) -> np.ndarray:
    return (buf.ctypes.data + np.arange(n, dtype=np.uint64) * P).astype(np.uint64)


def test_public_surface():
    assert codec.IMPLEMENTATION in NAMES
    assert codec.PAGE_SIZE == 4096 and codec.MAX_COMPRESSED == 3584
    assert codec.implementations()[codec.IMPLEMENTATION].compress_pages is codec.compress_pages
    assert "python" in codec.implementations()


def test_round_trip_of_the_page_mix(impl, mix):
    n, pages, _ = mix
    dst, sizes, total = compress(impl, pages, n)
    assert total == int(sizes.sum())
    assert total < pages.nbytes / 1.8  # the mix is ~2x compressible
    out = np.empty_like(pages)
    impl.decompress_pages(addresses(dst, n), sizes, n, out)
    np.testing.assert_array_equal(page_checksums(out, n), page_checksums(pages, n))
    out[:] = 0x55
    impl.decompress_buffer(dst, np.arange(n, dtype=np.uint64) * P, sizes, n, out)
    np.testing.assert_array_equal(out, pages)


def test_sizes_follow_the_page_kind(impl, mix):
    n, pages, kinds = mix
    dst, sizes, _ = compress(impl, pages, n)
    assert (sizes[kinds == KINDS.index("zero")] == 0).all()
    assert (sizes[kinds == KINDS.index("random")] == P).all()
    packed = sizes[(kinds == KINDS.index("text")) | (kinds == KINDS.index("binary"))]
    assert ((packed > 0) & (packed <= codec.MAX_COMPRESSED)).all()
    zero = np.flatnonzero(sizes == 0)
    assert (dst.reshape(n, P)[zero] == 0xAA).all(), "nothing is written for a zero page"
    raw = np.flatnonzero(sizes == P)
    np.testing.assert_array_equal(dst.reshape(n, P)[raw], pages.reshape(n, P)[raw])


def test_sizes_match_unbounded_lz4(impl, mix):
    """Bounding LZ4's output at MAX_COMPRESSED only turns long blocks into raw pages."""
    if impl.lz4_version() != lz4.library_version_string():
        pytest.skip(f"liblz4 {impl.lz4_version()} vs python-lz4's {lz4.library_version_string()}")
    n, pages, _ = mix
    _, sizes, _ = compress(impl, pages, n)
    for i, page in enumerate(pages.reshape(n, P)):
        block = len(lz4.block.compress(page, store_size=False))
        want = 0 if not page.any() else (P if block > codec.MAX_COMPRESSED else block)
        assert sizes[i] == want, i


def test_zero_detection_sees_every_byte(impl):
    pages = np.zeros((P // 64 + 2, P), dtype=np.uint8)
    for i in range(P // 64):
        pages[i, i * 64 + 63] = 1  # the last byte of each 64-byte step
    pages[-2, P - 1] = 0x80
    n = len(pages)
    dst, sizes, _ = compress(impl, pages, n)
    assert (sizes[:-1] > 0).all() and sizes[-1] == 0
    out = np.empty_like(pages)
    impl.decompress_buffer(dst, np.arange(n, dtype=np.uint64) * P, sizes, n, out)
    np.testing.assert_array_equal(out, pages)


def test_barely_compressible_page_is_stored_raw(impl):
    rng = np.random.default_rng(3)
    page = np.zeros(P, dtype=np.uint8)
    page[:3590] = rng.integers(0, 256, 3590, dtype=np.uint8)  # LZ4 would need > 3584 bytes
    assert len(lz4.block.compress(page, store_size=False)) > codec.MAX_COMPRESSED
    _, sizes, total = compress(impl, page, 1)
    assert sizes[0] == P and total == P


@pytest.mark.parametrize("writer", NAMES)
@pytest.mark.parametrize("reader", NAMES)
def test_images_are_interchangeable(writer, reader, mix):
    w, r = _get(writer), _get(reader)
    n, pages, _ = mix
    dst, sizes, _ = compress(w, pages, n)
    out = np.empty_like(pages)
    r.decompress_pages(addresses(dst, n), sizes, n, out)
    np.testing.assert_array_equal(out, pages)


def test_accepts_bytes_bytearray_and_memoryview(impl, mix):
    _, pages, _ = mix
    n = 16
    src = bytes(pages[: n * P])
    dst = bytearray(n * P)
    sizes = np.zeros(n, dtype=np.uint32)
    impl.compress_pages(memoryview(src), n, dst, sizes)
    out = bytearray(n * P)
    impl.decompress_buffer(bytes(dst), np.arange(n, dtype=np.uint64) * P, sizes, n, memoryview(out))
    assert out == src


def test_images_can_sit_anywhere_in_a_buffer(impl, mix):
    n, pages, _ = mix
    dst, sizes, _ = compress(impl, pages, n)
    packed = np.concatenate([dst[i * P : i * P + s] for i, s in enumerate(sizes)] + [np.zeros(1, np.uint8)])
    offsets = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.uint64)]).astype(np.uint64)
    out = np.empty_like(pages)
    impl.decompress_buffer(packed[:-1], offsets, sizes, n, out)
    np.testing.assert_array_equal(out, pages)
    # unaligned addresses inside the packed buffer
    impl.decompress_pages(packed.ctypes.data + offsets, sizes, n, out)
    np.testing.assert_array_equal(out, pages)


def test_empty_batch(impl):
    assert impl.compress_pages(b"", 0, bytearray(), np.zeros(0, np.uint32)) == 0
    impl.decompress_pages(np.zeros(0, np.uint64), np.zeros(0, np.uint32), 0, bytearray())
    impl.decompress_buffer(b"", np.zeros(0, np.uint64), np.zeros(0, np.uint32), 0, bytearray())


# -- corrupt input ------------------------------------------------------------------------------


def _one_block(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    block = np.frombuffer(lz4.block.compress(data, store_size=False), dtype=np.uint8)
    return block, np.array([len(block)], dtype=np.uint32)


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(lambda: _one_block(b"short page " * 100), id="decompresses-short"),
        pytest.param(lambda: _one_block(b"long page " * 1000), id="decompresses-long"),
        pytest.param(lambda: (np.full(100, 0xFF, np.uint8), np.array([100], np.uint32)), id="garbage"),
        pytest.param(lambda: (_one_block(b"abcdefgh" * 512)[0][:5], np.array([5], np.uint32)), id="truncated"),
    ],
)
def test_corrupt_image_names_the_page(impl, mix, image):
    _, pages, _ = mix
    n = 6
    dst, sizes, _ = compress(impl, pages, n)
    bad, bad_size = image()
    packed = np.concatenate([dst, bad])
    sizes[4] = bad_size[0]
    offsets = np.arange(n, dtype=np.uint64) * P
    offsets[4] = n * P
    out = np.empty(n * P, dtype=np.uint8)
    with pytest.raises(errors.CorruptDataError, match="page 4 "):
        impl.decompress_buffer(packed, offsets, sizes, n, out)
    with pytest.raises(errors.CorruptDataError, match="page 4 "):
        impl.decompress_pages(packed.ctypes.data + offsets, sizes, n, out)


# -- bad arguments ------------------------------------------------------------------------------


def test_compress_rejects_bad_sizes(impl):
    n = 4
    src, dst, sizes = np.zeros(n * P, np.uint8), np.zeros(n * P, np.uint8), np.zeros(n, np.uint32)
    with pytest.raises(ValueError, match="src"):
        impl.compress_pages(src[:-1], n, dst, sizes)
    with pytest.raises(ValueError, match="dst"):
        impl.compress_pages(src, n, dst[: 3 * P], sizes)
    with pytest.raises(ValueError, match="sizes"):
        impl.compress_pages(src, n, dst, sizes[:3])
    with pytest.raises(ValueError, match="n must be"):
        impl.compress_pages(src, -1, dst, sizes)
    with pytest.raises(ValueError, match="writable"):
        impl.compress_pages(src, n, bytes(n * P), sizes)
    with pytest.raises(ValueError):
        impl.compress_pages(src, n, dst, np.zeros(n, np.uint64))
    with pytest.raises(ValueError, match="acceleration"):
        impl.compress_pages(src, n, dst, sizes, acceleration=0)
    with pytest.raises(TypeError):
        impl.compress_pages(12345, n, dst, sizes)


def test_decompress_buffer_rejects_ranges_outside_the_source(impl):
    n = 2
    src = np.zeros(2 * P, np.uint8)
    out = np.zeros(n * P, np.uint8)
    offsets = np.array([0, P], np.uint64)
    for bad_offsets, bad_sizes in [
        ([0, P + 1], [P, P]),  # runs one byte past the end
        ([0, 2**64 - 1], [P, 10]),  # would wrap around
        ([0, 3 * P], [P, 0]),  # a zero page still needs a valid offset
        ([0, 0], [P, P + 1]),  # no page image is longer than a page
    ]:
        with pytest.raises(ValueError, match="page 1"):
            impl.decompress_buffer(src, np.array(bad_offsets, np.uint64), np.array(bad_sizes, np.uint32), n, out)
    sizes = np.array([P, P], np.uint32)
    with pytest.raises(ValueError, match="dst"):
        impl.decompress_buffer(src, offsets, sizes, n, out[:-1])
    with pytest.raises(ValueError, match="offsets"):
        impl.decompress_buffer(src, offsets[:1], sizes, n, out)
    with pytest.raises(ValueError, match="sizes"):
        impl.decompress_buffer(src, offsets, sizes[:1], n, out)
    with pytest.raises(ValueError, match="writable"):
        impl.decompress_buffer(src, offsets, sizes, n, bytes(n * P))


def test_decompress_pages_rejects_impossible_images(impl):
    n = 2
    src = np.zeros(n * P, np.uint8)
    out = np.zeros(n * P, np.uint8)
    with pytest.raises(ValueError, match="page 1"):
        impl.decompress_pages(addresses(src, n), np.array([P, P + 1], np.uint32), n, out)
    with pytest.raises(ValueError, match="page 0"):
        impl.decompress_pages(np.array([0, 0], np.uint64), np.array([P, 0], np.uint32), n, out)
    with pytest.raises(ValueError, match="sizes"):
        impl.decompress_pages(addresses(src, n), np.array([P], np.uint32), n, out)
    with pytest.raises(ValueError, match="dst"):
        impl.decompress_pages(addresses(src, n), np.array([P, P], np.uint32), n, out[:P])


# -- random pages -------------------------------------------------------------------------------


def _page(kind: int, pattern: bytes, edits: list[tuple[int, int]]) -> bytes:
    if kind == 0:
        page = bytearray(P)
    elif kind == 1:
        page = bytearray((pattern * (P // len(pattern) + 1))[:P])
    else:
        page = bytearray(np.random.default_rng(len(pattern) + 31 * len(edits)).bytes(P))
    for at, value in edits:
        page[at] = value
    return bytes(page)


pages_strategy = st.lists(
    st.builds(
        _page,
        st.integers(0, 2),
        st.binary(min_size=1, max_size=300),
        st.lists(st.tuples(st.integers(0, P - 1), st.integers(0, 255)), max_size=40),
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.parametrize("reader", NAMES)
@pytest.mark.parametrize("writer", NAMES)
@settings(max_examples=60, deadline=None)
@given(pages=pages_strategy)
def test_random_pages_round_trip(writer, reader, pages):
    w, r = _get(writer), _get(reader)
    n = len(pages)
    src = b"".join(pages)
    dst, sizes, total = compress(w, np.frombuffer(src, np.uint8), n)
    assert total == int(sizes.sum())
    for i, page in enumerate(pages):
        assert (sizes[i] == 0) == (page == bytes(P))
        assert sizes[i] == P or sizes[i] <= codec.MAX_COMPRESSED
    out = bytearray(n * P)
    r.decompress_pages(addresses(dst, n), sizes, n, out)
    assert bytes(out) == src


# -- the GIL ------------------------------------------------------------------------------------


def test_native_codec_releases_the_gil():
    """Python code on another thread keeps running while a batch is inside C."""
    native = _get("native")
    n = 8000
    pages = make_pages(n, seed=5)
    dst, sizes = np.empty_like(pages), np.zeros(n, np.uint32)
    span = {}

    def work():
        span["start"] = time.perf_counter()
        native.compress_pages(pages, n, dst, sizes)
        span["end"] = time.perf_counter()

    worker = threading.Thread(target=work)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    # With the GIL held, this thread could only run at the edges of the call (before C is
    # entered, after it returns), never in its middle half.
    start, end = span["start"], span["end"]
    lo, hi = start + (end - start) / 4, end - (end - start) / 4
    assert any(lo < t < hi for t in ticks), "the main thread did not run while the codec worked"
