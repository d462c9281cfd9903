"""A realistic, deterministic mix of 4 KiB pages for tests, benchmarks and the demo.

Kinds, as a swapped-out process would have them:
  zero    untouched or cleared memory;
  text    prose and log lines (LZ4 ~2x);
  binary  a heap: records with pointers and small integers, runs of identical records,
          small-int arrays, short strings and free gaps (LZ4 ~2.5x);
  random  compressed or encrypted data (incompressible).
Text and binary pages are 4 KiB windows at random offsets into a corpus generated once a
call, so pages differ from each other while the work stays vectorised.
"""
from __future__ import annotations

import zlib

import numpy as np

PAGE_SIZE = 4096

KINDS = ("zero", "text", "binary", "random")
DEFAULT_MIX = {"zero": 0.15, "text": 0.35, "binary": 0.35, "random": 0.15}

_CORPUS_BYTES = 2 << 20


def page_kinds(n: int, seed: int = 0, mix: dict[str, float] = DEFAULT_MIX) -> np.ndarray:
    """The kind of each page make_pages(n, seed, mix) makes: indexes into ``KINDS`` (uint8).

    Counts follow ``mix`` exactly (largest remainder), in a seeded random order.
    """
    unknown = set(mix) - set(KINDS)
    if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix must map some of {KINDS} to non-negative weights, got {mix!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    weights = np.array([mix.get(k, 0.0) for k in KINDS], dtype=np.float64)
    exact = weights / weights.sum() * n
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: n - counts.sum()]] += 1
    kinds = np.repeat(np.arange(len(KINDS), dtype=np.uint8), counts)
    return np.random.default_rng([seed, 1]).permutation(kinds)


def make_pages(n: int, seed: int = 0, mix: dict[str, float] = DEFAULT_MIX) -> np.ndarray:
    """n pages (a flat uint8 array of n*4096 bytes) of the kinds in ``mix``; same seed, same bytes."""
    kinds = page_kinds(n, seed, mix)
    pages = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
    rng = np.random.default_rng([seed, 2])
    for code, corpus_of in ((1, _text_corpus), (2, _binary_corpus)):
        where = np.flatnonzero(kinds == code)
        if len(where):
            corpus = corpus_of(rng)
            starts = rng.integers(0, len(corpus) - PAGE_SIZE, size=len(where))
            for row, start in zip(where.tolist(), starts.tolist()):  # slice copies beat a strided gather
                pages[row] = corpus[start : start + PAGE_SIZE]
    where = np.flatnonzero(kinds == 3)
    if len(where):
        pages[where] = np.frombuffer(rng.bytes(len(where) * PAGE_SIZE), dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return pages.reshape(-1)


def page_checksums(buf, n: int) -> np.ndarray:
    """CRC-32 of each of the first n pages of ``buf`` (uint32 array of n)."""
    view = memoryview(buf).cast("B")
    if view.nbytes < n * PAGE_SIZE:
        raise ValueError(f"buffer has {view.nbytes} bytes, fewer than n*4096 = {n * PAGE_SIZE}")
    return np.fromiter(
        (zlib.crc32(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i in range(n)), dtype=np.uint32, count=n
    )


# -- corpora ----------------------------------------------------------------------------------

_SYLLABLES = (
    "a ka ri to ne mo sa lu pe in on er st re de th an al es or ti ve co ma pro con ment ing "
    "tion data page mem ory cache node slab lease req uest ser ver key val"
).split()
_LEVELS = ("INFO ", "INFO ", "INFO ", "DEBUG", "WARN ", "ERROR")
_COMPONENTS = ("http", "db.pool", "scheduler", "auth", "cache", "worker", "rpc", "gc")
_VERBS = ("GET", "GET", "GET", "POST", "PUT", "DELETE")


def _vocabulary(rng: np.random.Generator, size: int = 1500) -> np.ndarray:
    parts = rng.integers(0, len(_SYLLABLES), size=(size, 3))
    lengths = rng.integers(1, 4, size=size)
    words = {"".join(_SYLLABLES[p] for p in row[:k]) for row, k in zip(parts, lengths)}
    return np.array(sorted(words))


def _text_corpus(rng: np.random.Generator) -> np.ndarray:
    """Paragraphs of Zipf-distributed words interleaved with blocks of log lines."""
    vocab = _vocabulary(rng)
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    chunks, size, clock = [], 0, 1_700_000_000.0
    while size < _CORPUS_BYTES:
        if rng.random() < 0.5:
            words = vocab[rng.choice(len(vocab), size=int(rng.integers(80, 400)), p=zipf)]
            text = " ".join(words).capitalize() + ".\n\n"
        else:
            lines = int(rng.integers(10, 60))
            clock += rng.exponential(5.0, size=lines).cumsum()[-1]
            ms = rng.integers(0, 1000, size=lines)
            ids = rng.integers(0, 1 << 32, size=lines)
            took = rng.geometric(0.05, size=lines)
            level = rng.integers(0, len(_LEVELS), size=lines)
            comp = rng.integers(0, len(_COMPONENTS), size=lines)
            verb = rng.integers(0, len(_VERBS), size=lines)
            path = vocab[rng.integers(0, 200, size=lines)]
            status = np.where(rng.random(lines) < 0.9, 200, 404)
            stamp = np.datetime_as_string(np.datetime64(int(clock), "s"))
            text = "".join(
                f"{stamp}.{ms[i]:03d} {_LEVELS[level[i]]} [{_COMPONENTS[comp[i]]}] request_id={ids[i]:08x} "
                f"{_VERBS[verb[i]]} /api/v1/{path[i]}/{ids[i] % 10000} status={status[i]} took={took[i]}ms\n"
                for i in range(lines)
            )
        data = text.encode()
        chunks.append(data)
        size += len(data)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


_RECORD = np.dtype(
    [
        ("header", "<u8"),  # type tag | size << 8, as an allocator header would be
        ("next", "<u8"),  # pointers into one heap region: high bytes shared
        ("data", "<u8"),
        ("refcount", "<u4"),
        ("length", "<u4"),
        ("flags", "<u2"),
        ("kind", "<u2"),
        ("hash", "<u4"),
    ]
)


def _records(rng: np.random.Generator, count: int, heap: int) -> np.ndarray:
    rec = np.zeros(count, dtype=_RECORD)
    tag = rng.integers(1, 12)
    rec["header"] = tag | (_RECORD.itemsize << 8)
    rec["next"] = heap + rng.integers(0, 1 << 16, size=count).astype(np.uint64) * 64
    rec["data"] = np.where(rng.random(count) < 0.3, 0, heap + rng.integers(0, 1 << 16, size=count) * 64)
    rec["refcount"] = rng.integers(1, 4, size=count)
    rec["length"] = rng.choice([0, 8, 16, 24, 32, 64, 128], size=count)
    rec["flags"] = rng.choice([0x1, 0x3, 0x11], size=count)
    rec["kind"] = tag
    rec["hash"] = np.where(rng.random(count) < 0.25, rng.integers(0, 1 << 32, size=count), 0)
    return rec.view(np.uint8)


def _binary_corpus(rng: np.random.Generator) -> np.ndarray:
    """A heap image: chunks of records, identical runs, small-int arrays, names and free gaps."""
    heap = 0x7F3A_0000_0000 + int(rng.integers(0, 1 << 16)) * (1 << 24)
    names = _vocabulary(rng, 200)
    chunks, size, after_gap = [], 0, True
    while size < _CORPUS_BYTES:
        pick = rng.random()
        if pick < 0.35:
            chunk = _records(rng, int(rng.integers(8, 100)), heap)
        elif pick < 0.50:
            chunk = np.tile(_records(rng, 1, heap), int(rng.integers(4, 60)))
        elif pick < 0.75:
            values = rng.choice(rng.integers(0, 1 << 12, size=16), size=int(rng.integers(64, 600)))
            chunk = values.astype(rng.choice(["<u2", "<u4", "<u8"])).view(np.uint8)
        elif pick < 0.90:
            text = b"\0".join(n.encode() for n in names[rng.integers(0, len(names), size=int(rng.integers(8, 64)))])
            chunk = np.frombuffer(text.ljust(-(-len(text) // 8) * 8, b"\0"), dtype=np.uint8)
        elif not after_gap:  # free space, never two gaps in a row so no window is all zero
            chunk = np.zeros(int(rng.integers(1, 32)) * 64, dtype=np.uint8)
        else:
            continue
        after_gap = pick >= 0.90
        chunks.append(chunk)
        size += len(chunk)
    return np.concatenate(chunks)
