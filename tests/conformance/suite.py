"""Transport conformance: the semantics of rram/transport/base.py, checked on any transport.

A test module runs it with::

    from tests.conformance.suite import *  # noqa

    @pytest.fixture
    def transport_pair():
        ...  # an object with .provider (ProviderTransport) and .requester (RequesterTransport)

Nothing here knows which transport it runs on.  Buffers are numpy arrays (stable addresses);
data is checked with CRC32.
"""
from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

from rram import errors
from rram.transport import OP_READ, OP_WRITE, new_completions, new_ops

PAGE = 4096
REGION = 4 << 20  # room for a 1024-page batch
_session_ids = itertools.count(1)


def crc(buf) -> int:
    return zlib.crc32(memoryview(buf).cast("B"))


def addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


class Link:
    """One provider session with a registered region, and one connected requester endpoint."""

    def __init__(self, pair, region_size: int = REGION, local_size: int = REGION):
        self.session = pair.provider.open_session(f"conformance-{next(_session_ids)}")
        self.remote = np.zeros(region_size, dtype=np.uint8)
        self.rkey = self.session.register(addr(self.remote), region_size)
        self.ep = pair.requester.endpoint()
        self.ep.connect(self.session.accept(self.ep.local_params()))
        self.local = np.zeros(local_size, dtype=np.uint8)
        self.lkey = self.ep.register_local(addr(self.local), local_size)
        self._batch = itertools.count(1)

    def batch_id(self) -> int:
        return next(self._batch)

    def ops(self, local_off, remote_off, lengths, opcode, *, rkey=None, lkey=None) -> np.ndarray:
        local_off = np.atleast_1d(np.asarray(local_off, dtype=np.uint64))
        n = len(local_off)
        ops = new_ops(n)
        ops["local_addr"] = addr(self.local) + local_off
        ops["remote_addr"] = addr(self.remote) + np.broadcast_to(np.asarray(remote_off, dtype=np.uint64), n)
        ops["length"] = lengths
        ops["lkey"] = self.lkey if lkey is None else lkey
        ops["rkey"] = self.rkey if rkey is None else rkey
        ops["opcode"] = opcode
        return ops

    def run(self, ops: np.ndarray) -> None:
        self.ep.execute(ops, self.batch_id(), timeout=10)

    def close(self) -> None:
        self.ep.close()
        self.session.close()


@pytest.fixture
def link(transport_pair):
    lk = Link(transport_pair)
    yield lk
    lk.close()


def fill(buf: np.ndarray, seed: int) -> None:
    buf[:] = np.random.default_rng(seed).integers(0, 256, len(buf), dtype=np.uint8)


def assert_usable(lk: Link) -> None:
    """A page round trip works, after recover() if the last error broke the endpoint."""

    def roundtrip(seed):
        fill(lk.local[:PAGE], seed)
        want = crc(lk.local[:PAGE])
        lk.run(lk.ops(0, 0, PAGE, OP_WRITE))
        lk.local[PAGE : 2 * PAGE] = 0
        lk.run(lk.ops(PAGE, 0, PAGE, OP_READ))
        assert crc(lk.local[PAGE : 2 * PAGE]) == want

    try:
        roundtrip(99)
    except (errors.ConnectionLost, errors.FlushedError):
        lk.ep.recover()
        roundtrip(100)


# -- data movement ------------------------------------------------------------------------------


def test_single_write_then_read(link):
    fill(link.local[:PAGE], 1)
    link.run(link.ops(0, 8 * PAGE, PAGE, OP_WRITE))
    assert crc(link.remote[8 * PAGE : 9 * PAGE]) == crc(link.local[:PAGE])
    link.run(link.ops(PAGE, 8 * PAGE, PAGE, OP_READ))
    assert crc(link.local[PAGE : 2 * PAGE]) == crc(link.local[:PAGE])


def test_batch_of_1024_pages(link):
    n = 1024
    assert link.ep.max_batch >= n
    offs = np.arange(n, dtype=np.uint64) * PAGE
    fill(link.local, 2)
    want = crc(link.local)
    link.run(link.ops(offs, offs[::-1], PAGE, OP_WRITE))  # page i lands at page n-1-i
    assert crc(link.remote[:PAGE]) == crc(link.local[(n - 1) * PAGE :])
    link.local[:] = 0
    link.run(link.ops(offs, offs[::-1], PAGE, OP_READ))
    assert crc(link.local) == want


def test_mixed_batch_executes_in_order(link):
    """WRITE page i, READ it back, in one batch: each READ sees the WRITE just before it."""
    n = 128
    fill(link.local[: n * PAGE], 3)
    want = crc(link.local[: n * PAGE])
    ops = new_ops(2 * n)
    ops[0::2] = link.ops(np.arange(n) * PAGE, np.arange(n) * PAGE, PAGE, OP_WRITE)
    ops[1::2] = link.ops(np.arange(n) * PAGE + n * PAGE, np.arange(n) * PAGE, PAGE, OP_READ)
    link.run(ops)
    assert crc(link.local[n * PAGE : 2 * n * PAGE]) == want
    assert crc(link.remote[: n * PAGE]) == want


def test_odd_lengths_and_offsets(link):
    rng = np.random.default_rng(4)
    n = 300
    lengths = rng.integers(1, 5000, n).astype(np.uint32)
    ends = np.cumsum(lengths.astype(np.uint64) + rng.integers(0, 7, n).astype(np.uint64)) + 3
    starts = ends - lengths  # disjoint, odd-aligned slices of the region
    assert int(ends[-1]) < REGION
    fill(link.local, 5)
    link.run(link.ops(starts, starts, lengths, OP_WRITE))
    pieces = [(int(s), int(s + ln)) for s, ln in zip(starts, lengths)]
    assert all(crc(link.remote[a:b]) == crc(link.local[a:b]) for a, b in pieces)
    want = crc(np.concatenate([link.local[a:b] for a, b in pieces]))
    link.local[:] = 0
    link.run(link.ops(starts, starts, lengths, OP_READ))
    assert crc(np.concatenate([link.local[a:b] for a, b in pieces])) == want


def test_whole_region_in_one_op(transport_pair):
    size = 256 << 10
    lk = Link(transport_pair, region_size=size, local_size=2 * size)
    try:
        fill(lk.local[:size], 6)
        lk.run(lk.ops(0, 0, size, OP_WRITE))
        assert crc(lk.remote) == crc(lk.local[:size])
        lk.run(lk.ops(size, 0, size, OP_READ))
        assert crc(lk.local[size:]) == crc(lk.remote)
    finally:
        lk.close()


def test_pipelined_batches_complete_in_posting_order(link):
    depth = min(link.ep.max_outstanding, 8)
    per = 64
    fill(link.local, 7)
    ids = [link.batch_id() for _ in range(depth)]
    for k, bid in enumerate(ids):
        offs = (np.arange(per) + k * per) * PAGE
        link.ep.post(link.ops(offs, offs, PAGE, OP_WRITE), bid)
    assert link.ep.outstanding == depth
    out = new_completions(depth)
    seen = []
    while len(seen) < depth:
        got = link.ep.poll(out, timeout=10)
        assert got, "no completion within 10 s"
        assert (out["status"][:got] == 0).all()
        seen.extend(int(b) for b in out["batch_id"][:got])
    assert seen == ids
    assert link.ep.outstanding == 0
    span = depth * per * PAGE
    assert crc(link.remote[:span]) == crc(link.local[:span])


# -- protection ---------------------------------------------------------------------------------


def test_bad_rkey_is_remote_access_error(link):
    fill(link.local[: 4 * PAGE], 8)
    ops = link.ops(np.arange(4) * PAGE, np.arange(4) * PAGE, PAGE, OP_WRITE)
    ops["rkey"][2] = link.rkey ^ 0x5A5A5A
    with pytest.raises(errors.RemoteAccessError) as exc:
        link.run(ops)
    assert exc.value.index == 2
    assert crc(link.remote[:PAGE]) == crc(link.local[:PAGE])  # ops before the bad one ran
    assert not link.remote[3 * PAGE : 4 * PAGE].any()  # ops after it did not
    assert_usable(link)


@pytest.mark.parametrize("where", ["before_start", "past_end", "straddles_end"])
def test_out_of_bounds_is_remote_access_error(link, where):
    base = 0
    if where == "before_start":
        ops = link.ops(0, 0, PAGE, OP_READ)
        ops["remote_addr"] = addr(link.remote) - PAGE
    elif where == "past_end":
        ops = link.ops(0, REGION, PAGE, OP_READ)
    else:
        base = REGION - PAGE // 2
        ops = link.ops(0, base, PAGE, OP_WRITE)
    with pytest.raises(errors.RemoteAccessError):
        link.run(ops)
    assert not link.remote.any()
    assert_usable(link)


def test_local_buffer_outside_lkey_region_is_local_protection_error(link):
    ops = link.ops([0, REGION - PAGE // 2], [0, PAGE], PAGE, OP_READ)  # op 1 runs past the local region
    with pytest.raises(errors.LocalProtectionError) as exc:
        link.run(ops)
    assert exc.value.index == 1
    assert_usable(link)


def test_unknown_lkey_is_local_protection_error(link):
    with pytest.raises(errors.LocalProtectionError):
        link.run(link.ops(0, 0, PAGE, OP_WRITE, lkey=link.lkey ^ 0x777))
    assert_usable(link)


def test_deregistered_region_cannot_be_accessed(link):
    extra = np.zeros(4 * PAGE, dtype=np.uint8)
    rkey = link.session.register(addr(extra), extra.size)
    fill(link.local[:PAGE], 9)
    ops = link.ops(0, 0, PAGE, OP_WRITE, rkey=rkey)
    ops["remote_addr"] = addr(extra)
    link.run(ops)
    assert crc(extra[:PAGE]) == crc(link.local[:PAGE])
    link.session.deregister(rkey)
    extra[:] = 0
    with pytest.raises(errors.RemoteAccessError):
        link.run(ops)
    assert not extra.any()
    assert_usable(link)


def test_other_sessions_rkey_is_rejected(transport_pair):
    a, b = Link(transport_pair), Link(transport_pair)
    try:
        fill(a.local[:PAGE], 10)
        ops = a.ops(0, 0, PAGE, OP_WRITE, rkey=b.rkey)
        ops["remote_addr"] = addr(b.remote)
        with pytest.raises(errors.RemoteAccessError):
            a.run(ops)
        assert not b.remote.any()
        assert_usable(a)
    finally:
        a.close()
        b.close()


def test_two_sessions_are_isolated(transport_pair):
    a, b = Link(transport_pair), Link(transport_pair)
    try:
        fill(a.local[: 16 * PAGE], 11)
        fill(b.local[: 16 * PAGE], 12)
        offs = np.arange(16) * PAGE
        a.run(a.ops(offs, offs, PAGE, OP_WRITE))
        b.run(b.ops(offs, offs, PAGE, OP_WRITE))
        for lk in (a, b):
            want = crc(lk.local[: 16 * PAGE])
            lk.local[: 16 * PAGE] = 0
            lk.run(lk.ops(offs, offs, PAGE, OP_READ))
            assert crc(lk.local[: 16 * PAGE]) == want
        assert crc(a.remote[: 16 * PAGE]) != crc(b.remote[: 16 * PAGE])
    finally:
        a.close()
        b.close()


def test_closed_session_refuses_its_endpoint(transport_pair):
    lk = Link(transport_pair)
    try:
        lk.run(lk.ops(0, 0, PAGE, OP_WRITE))
        lk.session.close()
        with pytest.raises(errors.TransportError):
            lk.run(lk.ops(0, 0, PAGE, OP_WRITE))
    finally:
        lk.close()


# -- lifecycle and flow control -----------------------------------------------------------------


def test_close_is_idempotent(transport_pair):
    lk = Link(transport_pair)
    lk.ep.close()
    lk.ep.close()
    lk.session.close()
    lk.session.close()


def test_poll_timeout_returns_zero(link):
    out = new_completions(4)
    assert link.ep.poll(out, timeout=0) == 0
    assert link.ep.poll(out, timeout=0.05) == 0
    assert_usable(link)


def test_max_outstanding_is_enforced(link):
    limit = link.ep.max_outstanding
    for _ in range(limit):
        link.ep.post(link.ops(0, 0, PAGE, OP_READ), link.batch_id())
    with pytest.raises(errors.TransportError):
        link.ep.post(link.ops(0, 0, PAGE, OP_READ), link.batch_id())
    out = new_completions(limit)
    done = 0
    while done < limit:
        got = link.ep.poll(out, timeout=10)
        assert got, "no completion within 10 s"
        assert (out["status"][:got] == 0).all()
        done += got
    assert link.ep.outstanding == 0
    assert_usable(link)
