"""The page seal (ext/_seal.pyx): AES-256-GCM images bound to requester, page key and version."""
from __future__ import annotations

import os

import numpy as np
import pytest

from rram._ext._seal import ALGORITHM, STRIDE, TAG, Sealer
from rram.errors import RramError, SealError

N = 8


class Slots:
    """N seal-buffer slots of STRIDE bytes holding images of the given sizes."""

    def __init__(self, sizes, seed=1):
        self.buf = np.zeros(N * STRIDE, dtype=np.uint8)
        self.addrs = self.buf.ctypes.data + np.arange(N, dtype=np.uint64) * np.uint64(STRIDE)
        self.sizes = np.asarray(sizes, dtype=np.uint32)
        rng = np.random.default_rng(seed)
        for i, size in enumerate(self.sizes):
            self.buf[i * STRIDE : i * STRIDE + size] = rng.integers(0, 256, size, dtype=np.uint8)
        self.plain = [self.image(i) for i in range(N)]

    def image(self, i, extra=0):
        return self.buf[i * STRIDE : i * STRIDE + int(self.sizes[i]) + extra].tobytes()


def sealed(sealer, slots, keys):
    versions = np.zeros(N, dtype=np.uint64)
    sealer.take_versions(versions, N)
    sealer.seal(slots.addrs, slots.addrs, slots.sizes, keys, versions, N)
    return versions


def open_all(sealer, slots, keys, versions):
    ok = np.zeros(N, dtype=np.uint8)
    bad = sealer.open(slots.addrs, slots.sizes + np.uint32(TAG), keys, versions, N, ok)
    return bad, ok


def test_round_trip_in_place_for_every_image_size():
    s = Sealer(os.urandom(32), requester=7)
    slots = Slots([1, 63, 64, 1000, 2048, 3584, 4095, 4096])
    keys = np.arange(100, 100 + N, dtype=np.uint64)
    versions = sealed(s, slots, keys)
    assert list(versions) == list(range(1, N + 1))  # every seal takes a fresh version (the nonce)
    # a short ciphertext may equal its plaintext by chance (a 1-byte one, 1 time in 256)
    assert all(slots.image(i) != slots.plain[i] for i in range(N) if slots.sizes[i] >= 16)
    bad, ok = open_all(s, slots, keys, versions)
    assert bad == 0 and ok.all()
    assert all(slots.image(i) == slots.plain[i] for i in range(N))
    assert (s.sealed, s.opened, s.failures) == (N, N, 0)
    assert ALGORITHM == "AES-256-GCM" and TAG == 16 and STRIDE >= 4096 + TAG


def test_images_are_standard_aes_256_gcm_with_the_documented_nonce_and_aad():
    """An independent implementation (cryptography's AESGCM, its own OpenSSL) opens what the
    Sealer sealed and seals what it opens: the format is the module docstring's, whichever
    library does the work."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, requester = os.urandom(32), 0x0102030405060708
    s = Sealer(key, requester=requester)
    slots = Slots([1, 100, 2200, 4095, 4096, 17, 333, 2048], seed=5)
    keys = np.arange(40, 40 + N, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    versions = sealed(s, slots, keys)
    ref = AESGCM(key)
    le = lambda v: int(v).to_bytes(8, "little")
    for i in range(N):
        nonce, aad = le(versions[i]) + bytes(4), le(requester) + le(keys[i]) + le(versions[i])
        assert ref.decrypt(nonce, slots.image(i, TAG), aad) == slots.plain[i]
        view = slots.buf[i * STRIDE : i * STRIDE + int(slots.sizes[i]) + TAG]
        view[:] = np.frombuffer(ref.encrypt(nonce, slots.plain[i], aad), dtype=np.uint8)
    bad, ok = open_all(s, slots, keys, versions)
    assert bad == 0 and ok.all()
    assert all(slots.image(i) == slots.plain[i] for i in range(N))


def test_the_same_image_seals_differently_each_time():
    s = Sealer(os.urandom(32))
    a, b = Slots([4096] * N), Slots([4096] * N)
    keys = np.ones(N, dtype=np.uint64)
    sealed(s, a, keys)
    sealed(s, b, keys)
    assert a.image(0, TAG) != b.image(0, TAG)


@pytest.mark.parametrize("change", ["byte", "tag", "key", "version", "requester", "seal key", "size"])
def test_anything_changed_fails_the_tag_and_leaves_no_plaintext(change):
    key = os.urandom(32)
    s = Sealer(key, requester=1)
    slots = Slots([2000] * N)
    keys = np.arange(N, dtype=np.uint64)
    versions = sealed(s, slots, keys)
    opener = s
    if change == "byte":
        slots.buf[3 * STRIDE + 10] ^= 1
    elif change == "tag":
        slots.buf[3 * STRIDE + 2000 + 15] ^= 0x80
    elif change == "key":
        keys[3] = 99  # a page swapped in from another key
    elif change == "version":
        versions[3] -= 1  # an older version of the same page (a replay)
    elif change == "requester":
        opener = Sealer(key, requester=2)
    elif change == "seal key":
        opener = Sealer(os.urandom(32), requester=1)
    ok = np.zeros(N, dtype=np.uint8)
    sizes = slots.sizes + np.uint32(TAG)
    if change == "size":
        sizes[3] -= 1
    bad = opener.open(slots.addrs, sizes, keys, versions, N, ok)
    expect_bad = N if change in ("requester", "seal key") else 1
    assert bad == expect_bad and opener.failures == expect_bad
    if expect_bad == 1:
        assert ok.tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
        assert slots.image(2) == slots.plain[2]
    opened = 1999 if change == "size" else 2000  # what the failed open would have decrypted
    assert slots.image(3)[:opened] == bytes(opened)  # never the unauthenticated plaintext


def test_the_one_page_call_and_bad_arguments():
    s = Sealer(os.urandom(32))
    slots = Slots([500] * N)
    keys = np.arange(N, dtype=np.uint64)
    versions = sealed(s, slots, keys)
    assert s.open_page(int(slots.addrs[0]), 500 + TAG, 0, int(versions[0]))
    assert slots.image(0) == slots.plain[0]
    assert not s.open_page(int(slots.addrs[1]), 500 + TAG, 0, int(versions[1]))  # another page's key
    assert not s.open_page(int(slots.addrs[2]), TAG, 2, int(versions[2]))  # no room for an image
    assert not s.open_page(int(slots.addrs[2]), 500 + TAG, 2, 0)  # version 0: never sealed
    with pytest.raises(ValueError, match="32 bytes"):
        Sealer(b"short")
    with pytest.raises(ValueError, match="versions start at 1"):
        Sealer(os.urandom(32), first_version=0)
    with pytest.raises(ValueError, match="sizes"):
        s.seal(slots.addrs, slots.addrs, np.full(N, 4097, dtype=np.uint32), keys, versions, N)
    with pytest.raises(ValueError, match="need 9 items"):
        s.seal(slots.addrs, slots.addrs, slots.sizes, keys, versions, N + 1)
    assert issubclass(SealError, RramError) and SealError.errno == 5


def _sealed_in_remote_slabs(requester: int, first_key: int, persistent_pages: int):
    """N pages sealed by a Sealer of ``requester`` in Slots, their sealed images given remote slots
    (the first ``persistent_pages`` in a persistent slab, the rest in an ephemeral one) whose
    owner words are their seal versions, as the store's allocators hold them."""
    from rram._ext._slab import SlotAllocator
    from rram.datapath import slab as L

    s = Sealer(os.urandom(32), requester=requester)
    slots = Slots([100, 2000, 4096, 1, 3000, 64, 4000, 700])
    keys = np.arange(first_key, first_key + N, dtype=np.uint64)
    versions = sealed(s, slots, keys)
    persistent, ephemeral = SlotAllocator(track_owners=True), SlotAllocator(track_owners=True)
    persistent.add_slab(L.FIRST_REMOTE_SLAB, 1 << 20)
    ephemeral.add_slab(L.FIRST_REMOTE_SLAB + 1, 1 << 20)
    locs = np.zeros(N, dtype=np.uint64)
    sealed_sizes = slots.sizes + np.uint32(TAG)
    k = persistent_pages
    persistent.alloc(sealed_sizes[:k], locs[:k], versions[:k])
    ephemeral.alloc(sealed_sizes[k:], locs[k:], versions[k:])
    return s, slots, keys, persistent, ephemeral, locs, sealed_sizes


def test_open_reads_opens_one_links_pages_of_a_planned_batch():
    """The fast path's call: pages located by their READs' addresses, versions from the remote
    allocators' owner words, sizes cut by the tag; a bad tag marks only that page."""
    from rram._ext._slab import SlotAllocator
    from rram.datapath import slab as L
    from rram.transport import OP_READ, new_ops

    s, slots, keys, persistent, ephemeral, locs, sealed_sizes = _sealed_in_remote_slabs(3, 500, N // 2)
    locs[0] = L.ZERO_LOCATION  # a zero page: not READ, left alone
    slots.buf[5 * STRIDE + 10] ^= 1  # page 5's ciphertext altered
    base = int(slots.addrs[0])
    ops = new_ops(N)
    ops["opcode"] = OP_READ
    reads = np.arange(1, N)  # the READs one link brought in, in any order
    ops["local_addr"][: len(reads)] = slots.addrs[reads[::-1]]
    ops["length"][: len(reads)] = sealed_sizes[reads[::-1]]
    sizes = sealed_sizes.copy()
    ok = np.zeros(N, dtype=np.uint8)
    bad = s.open_reads(ops, len(reads), base, STRIDE, locs, keys, sizes, N, persistent, ephemeral, ok)
    assert bad == 1 and list(ok[1:]) == [1, 1, 1, 1, 0, 1, 1] and s.failures == 1
    assert all(slots.image(i) == slots.plain[i] for i in (1, 2, 3, 4, 6, 7))
    assert list(sizes[1:]) == [int(x) for x in slots.sizes[1:5]] + [int(sealed_sizes[5])] + [int(x) for x in slots.sizes[6:]]
    assert slots.image(5) == bytes(int(slots.sizes[5]))  # no unauthenticated plaintext left behind
    ops["local_addr"][0] += 1  # a READ that is not one of the plan's: a bug, said loudly
    with pytest.raises(RramError, match="does not match the planned batch"):
        s.open_reads(ops, 1, base, STRIDE, locs, keys, sizes, N, persistent, ephemeral, ok)
    with pytest.raises(ValueError, match="tracking owners"):
        s.open_reads(ops, 0, base, STRIDE, locs, keys, sizes, N, SlotAllocator(), ephemeral, ok)


def test_planned_reads_open_each_chunk_as_it_lands():
    """PlannedReads binds a batch once and opens chunk after chunk, as ``open_reads`` would:
    the same pages opened, sizes cut, the bad tag marked and counted, a stray READ refused."""
    from rram._ext._seal import PlannedReads
    from rram._ext._slab import SlotAllocator
    from rram.transport import OP_READ, new_ops

    s, slots, keys, persistent, ephemeral, locs, sealed_sizes = _sealed_in_remote_slabs(5, 900, 5)
    slots.buf[2 * STRIDE + 99] ^= 1  # page 2's ciphertext altered
    base = int(slots.addrs[0])
    ops = new_ops(N)
    ops["opcode"] = OP_READ
    ops["local_addr"] = slots.addrs
    ops["length"] = sealed_sizes
    sizes = sealed_sizes.copy()
    ok = np.zeros(N, dtype=np.uint8)
    with pytest.raises(ValueError, match="tracking owners"):
        PlannedReads(s, base, STRIDE, SlotAllocator(), ephemeral)
    reads = PlannedReads(s, base, STRIDE, persistent, ephemeral)
    reads.start(locs, keys, sizes, ok, N)
    # run_routed hands over the link's whole op array and the chunk's bounds
    assert [reads.landed(ops, a, b) for a, b in ((0, 3), (3, 7), (7, 8))] == [1, 0, 0]
    assert reads.bad == 1 and s.failures == 1 and list(ok) == [1, 1, 0, 1, 1, 1, 1, 1]
    assert all(slots.image(i) == slots.plain[i] for i in range(N) if i != 2)
    assert slots.image(2) == bytes(int(slots.sizes[2]))
    assert list(sizes) == [int(x) for x in slots.sizes[:2]] + [int(sealed_sizes[2])] + [int(x) for x in slots.sizes[3:]]
    reads.start(locs, keys, sizes, ok, N)  # a new batch starts its own count
    assert reads.bad == 0
    with pytest.raises(ValueError, match="not within"):
        reads.landed(ops, 7, N + 1)
    ops["local_addr"][0] += 8  # the same array, changed in place: seen through the kept address
    with pytest.raises(RramError, match="does not match the planned batch"):
        reads.landed(ops, 0, 1)
    with pytest.raises(RramError, match="does not match the planned batch"):
        reads.landed(ops[:1])  # another array (a slice, to its end)

