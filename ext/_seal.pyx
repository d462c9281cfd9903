# cython: language_level=3
"""Sealed pages: AES-256-GCM over each stored image a provider keeps (libgcrypt's cipher API).

A sealed image is the stored image (LZ4 block or raw page) encrypted, followed by the 16-byte
GCM tag.  The key is random per Sealer (per requester store process: pages never outlive it)
and never leaves the requester.  Each seal takes a fresh *version* from a 64-bit counter:

    nonce (12 bytes)            = version (8, little-endian) || 0 (4)
    associated data (24 bytes)  = requester (8) || page key (8) || version (8)

The counter makes every nonce unique under the key (GCM's one hard rule).  The requester keeps
each remote page's version (the remote allocator's per-slot word), so an image opens only as
the page key and version it was sealed for: a provider that swaps two pages, or puts back an
older image of the same page, fails the tag, as does any altered byte.

Batches are one call each, with the GIL released; single pages (the C request path) use the
cdef methods declared in rram/_ext/_seal.pxd.

Why libgcrypt and not OpenSSL 3.0's EVP (which this module used first): a page is one short
message (~2.2 KiB compressed), so the per-message cost counts as much as the bulk.  EVP in 3.0
goes through its provider layer on every call (the tag travels as an OSSL_PARAM found by name)
and its AES-GCM on this AMD EPYC (VAES, no AVX-512) is the 128-bit AES-NI one; libgcrypt 1.10
keys a handle once, sets the nonce with a memcpy, and runs CTR and GHASH with 256-bit
VAES/VPCLMUL.  Opening a 2.2 KiB image took ~1.0 us with EVP against ~0.73 us (best of 8,
loaded 2-vCPU machine; a 64-byte one 0.32 against 0.15 us), and sealed gets spend most of
their extra CPU there (docs/architecture.md).
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release

from location cimport FIRST_REMOTE_SLAB, KIND_MASK, KIND_STORED, loc_size, loc_slab
from ops cimport op_t
from rram._ext._slab cimport E_OK, SlotAllocator

from rram.errors import RramError

cdef extern from "gcrypt.h" nogil:
    ctypedef unsigned int gcry_error_t
    ctypedef struct gcry_cipher_handle:
        pass
    ctypedef gcry_cipher_handle *gcry_cipher_hd_t
    int GCRY_CIPHER_AES256
    int GCRY_CIPHER_MODE_GCM
    const char *GCRYPT_VERSION
    const char *gcry_check_version(const char *req_version)
    gcry_error_t gcry_cipher_open(gcry_cipher_hd_t *hd, int algo, int mode, unsigned int flags)
    void gcry_cipher_close(gcry_cipher_hd_t h)  # wipes the expanded key
    gcry_error_t gcry_cipher_setkey(gcry_cipher_hd_t h, const void *key, size_t keylen)
    gcry_error_t gcry_cipher_setiv(gcry_cipher_hd_t h, const void *iv, size_t ivlen)
    gcry_error_t gcry_cipher_authenticate(gcry_cipher_hd_t h, const void *abuf, size_t abuflen)
    gcry_error_t gcry_cipher_encrypt(gcry_cipher_hd_t h, void *out, size_t outsize, const void *inp, size_t inlen)
    gcry_error_t gcry_cipher_decrypt(gcry_cipher_hd_t h, void *out, size_t outsize, const void *inp, size_t inlen)
    gcry_error_t gcry_cipher_gettag(gcry_cipher_hd_t h, void *outtag, size_t taglen)
    gcry_error_t gcry_cipher_checktag(gcry_cipher_hd_t h, const void *intag, size_t taglen)  # constant time

# libgcrypt's one-time set-up (a library leaves the rest of its initialization to the
# application); the header's version is the least the library may be
if gcry_check_version(GCRYPT_VERSION) == NULL:
    raise ImportError(f"libgcrypt is older than the {GCRYPT_VERSION.decode()} this module was built against")

cdef enum:
    KEY_BYTES = 32
    NONCE_BYTES = 12
    AAD_BYTES = 24
    MAX_IMAGE = 4096

TAG = SEAL_TAG
STRIDE = SEAL_STRIDE
ALGORITHM = "AES-256-GCM"


cdef inline void _put64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))


cdef inline void _context(uint64_t requester, uint64_t key, uint64_t version, uint8_t *nonce,
                          uint8_t *aad) noexcept nogil:
    memset(nonce, 0, NONCE_BYTES)
    _put64(nonce, version)
    _put64(aad, requester)
    _put64(aad + 8, key)
    _put64(aad + 16, version)


cdef const uint64_t *_u64(object arr, Py_ssize_t n, str what) except NULL:
    return <const uint64_t *>_buf(arr, 8, n, False, what)


cdef void *_buf(object arr, Py_ssize_t itemsize, Py_ssize_t n, bint writable, str what) except NULL:
    """Address of a C-contiguous array of at least ``n`` items (the caller keeps it alive)."""
    cdef Py_buffer b
    cdef void *p
    PyObject_GetBuffer(arr, &b, PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0))
    try:
        if b.itemsize != itemsize or b.len < n * itemsize:
            raise ValueError(f"{what}: need {n} items of {itemsize} bytes, got {b.len} bytes of {b.itemsize}-byte items")
        p = b.buf
    finally:
        PyBuffer_Release(&b)
    return p


cdef class Sealer:
    """AES-256-GCM seals of page images under one key; see the module docstring."""

    def __cinit__(self, key, uint64_t requester=0, uint64_t first_version=1):
        cdef const uint8_t[::1] k = key
        self.enc = NULL
        self.dec = NULL
        if k.shape[0] != KEY_BYTES:
            raise ValueError(f"the seal key must be {KEY_BYTES} bytes, got {k.shape[0]}")
        if first_version == 0:
            raise ValueError("versions start at 1 (0 marks a slot with no version)")
        self.requester = requester
        self.next_version = first_version
        # the key is expanded into the handles once; each page only sets its nonce
        if (gcry_cipher_open(<gcry_cipher_hd_t *>&self.enc, GCRY_CIPHER_AES256, GCRY_CIPHER_MODE_GCM, 0) != 0
                or gcry_cipher_open(<gcry_cipher_hd_t *>&self.dec, GCRY_CIPHER_AES256, GCRY_CIPHER_MODE_GCM, 0) != 0):
            raise MemoryError("libgcrypt could not open an AES-256-GCM handle")
        if (gcry_cipher_setkey(<gcry_cipher_hd_t>self.enc, &k[0], KEY_BYTES) != 0
                or gcry_cipher_setkey(<gcry_cipher_hd_t>self.dec, &k[0], KEY_BYTES) != 0):
            raise RramError("libgcrypt refused the AES-256-GCM key")

    def __dealloc__(self):
        if self.enc != NULL:
            gcry_cipher_close(<gcry_cipher_hd_t>self.enc)  # wipes the expanded key
        if self.dec != NULL:
            gcry_cipher_close(<gcry_cipher_hd_t>self.dec)

    cdef uint64_t take_version(self) noexcept nogil:
        self.next_version += 1
        return self.next_version - 1

    cdef int seal_one(self, const uint8_t *src, uint8_t *dst, uint32_t size, uint64_t key,
                      uint64_t version) noexcept nogil:
        cdef gcry_cipher_hd_t h = <gcry_cipher_hd_t>self.enc
        cdef uint8_t nonce[NONCE_BYTES]
        cdef uint8_t aad[AAD_BYTES]
        _context(self.requester, key, version, nonce, aad)
        if (gcry_cipher_setiv(h, nonce, NONCE_BYTES) != 0
                or gcry_cipher_authenticate(h, aad, AAD_BYTES) != 0
                or gcry_cipher_encrypt(h, dst, size, src, size) != 0
                or gcry_cipher_gettag(h, dst + size, SEAL_TAG) != 0):
            return -1
        self.sealed += 1
        return 0

    cdef int open_one(self, uint8_t *buf, uint32_t sealed_size, uint64_t key, uint64_t version,
                      bint count=True) noexcept nogil:
        cdef gcry_cipher_hd_t h = <gcry_cipher_hd_t>self.dec
        cdef uint8_t nonce[NONCE_BYTES]
        cdef uint8_t aad[AAD_BYTES]
        cdef uint32_t size
        if sealed_size <= SEAL_TAG or sealed_size > MAX_IMAGE + SEAL_TAG or version == 0:
            self.failures += count
            return 0
        size = sealed_size - SEAL_TAG
        _context(self.requester, key, version, nonce, aad)
        # decrypted in place: the first ``size`` bytes only, so the tag after them stays as READ
        if (gcry_cipher_setiv(h, nonce, NONCE_BYTES) != 0
                or gcry_cipher_authenticate(h, aad, AAD_BYTES) != 0
                or gcry_cipher_decrypt(h, buf, size, NULL, 0) != 0
                or gcry_cipher_checktag(h, buf + size, SEAL_TAG) != 0):
            # never leave unauthenticated plaintext behind for a caller that ignores the result
            memset(buf, 0, size)
            self.failures += count
            return 0
        self.opened += 1
        return 1

    # -- batches (Python-callable, one call each, GIL released) --------------------------------

    def take_versions(self, uint64_t[::1] out, Py_ssize_t n):
        """out[:n] = n fresh versions (each used for exactly one seal)."""
        cdef Py_ssize_t i
        if n < 0 or n > out.shape[0]:
            raise ValueError(f"n={n} exceeds out ({out.shape[0]})")
        for i in range(n):
            out[i] = self.take_version()

    def seal(self, srcs, dsts, sizes, keys, versions, Py_ssize_t n):
        """Seal sizes[i] bytes at address srcs[i] to dsts[i] (sizes[i] + TAG bytes; may be srcs[i])
        for page key keys[i] under versions[i] (from take_versions)."""
        cdef const uint64_t *s = _u64(srcs, n, "srcs")
        cdef const uint64_t *d = _u64(dsts, n, "dsts")
        cdef const uint32_t *z = <const uint32_t *>_buf(sizes, 4, n, False, "sizes")
        cdef const uint64_t *k = _u64(keys, n, "keys")
        cdef const uint64_t *v = _u64(versions, n, "versions")
        cdef Py_ssize_t i, bad = -1
        for i in range(n):
            if z[i] == 0 or z[i] > MAX_IMAGE or v[i] == 0:
                raise ValueError(f"sizes[{i}] = {z[i]} (1..{MAX_IMAGE}) or versions[{i}] = {v[i]} (not 0) is wrong")
        with nogil:
            for i in range(n):
                if self.seal_one(<const uint8_t *><uintptr_t>s[i], <uint8_t *><uintptr_t>d[i], z[i], k[i], v[i]) < 0:
                    bad = i
                    break
        if bad >= 0:
            raise RramError(f"libgcrypt failed to seal page {bad} of {n}")

    def open_reads(self, ops, Py_ssize_t count, uint64_t base, uint64_t stride, locs, keys, sizes,
                   Py_ssize_t n, SlotAllocator versions_r, SlotAllocator versions_e, ok):
        """Open in place the pages READs of a planned batch brought in (PlannedReads binds the
        plan once and opens each link's or chunk's READs as they land; this is one such call).

        ``ops[:count]``: READs, each into base + i * stride for page i of a planned
        batch of n (locs[i], keys[i], sizes[i] its sealed size).  Each image is opened with the
        version its slot's owner word holds (in ``versions_r``, else ``versions_e``) and
        sizes[i] drops by TAG, ready for decompression; where the tag (or the version lookup)
        fails, ok[i] = 0, those bytes are zeroed and sizes[i] is left as it was.  Returns the
        number that failed (each counted in ``failures``).
        """
        cdef const op_t *op = <const op_t *>_buf(ops, sizeof(op_t), count, False, "ops")
        cdef const uint64_t *l = _u64(locs, n, "locs")
        cdef const uint64_t *k = _u64(keys, n, "keys")
        cdef uint32_t *z = <uint32_t *>_buf(sizes, 4, n, True, "sizes")
        cdef uint8_t *o = <uint8_t *>_buf(ok, 1, n, True, "ok")
        _check_plan(versions_r, versions_e, stride)
        return _open_ops(self, op, count, base, stride, l, k, z, o, n, versions_r, versions_e)

    def open_page(self, uint64_t addr, uint32_t sealed_size, uint64_t key, uint64_t version) -> bool:
        """``open`` for one page (the latency path: no arrays)."""
        cdef bint good
        with nogil:
            good = self.open_one(<uint8_t *><uintptr_t>addr, sealed_size, key, version)
        return good

    def open(self, addrs, sizes, keys, versions, Py_ssize_t n, ok):
        """Open the sealed images at addrs[i] (sizes[i] bytes, tag included) in place; ok[i] = 1
        where the tag verified for (keys[i], versions[i]), else 0 (the bytes are zeroed).
        Returns the number that failed."""
        cdef const uint64_t *a = _u64(addrs, n, "addrs")
        cdef const uint32_t *z = <const uint32_t *>_buf(sizes, 4, n, False, "sizes")
        cdef const uint64_t *k = _u64(keys, n, "keys")
        cdef const uint64_t *v = _u64(versions, n, "versions")
        cdef uint8_t *o = <uint8_t *>_buf(ok, 1, n, True, "ok")
        cdef Py_ssize_t i, bad = 0
        with nogil:
            for i in range(n):
                o[i] = self.open_one(<uint8_t *><uintptr_t>a[i], z[i], k[i], v[i])
                bad += 1 - o[i]
        return bad


cdef int _check_plan(SlotAllocator versions_r, SlotAllocator versions_e, uint64_t stride) except -1:
    if versions_r is None or versions_e is None or not (versions_r.track_owners and versions_e.track_owners):
        raise ValueError("open_reads needs both remote allocators, tracking owners (the versions)")
    if stride == 0:
        raise ValueError("stride must not be 0")
    return 0


cdef Py_ssize_t _open_ops(Sealer sealer, const op_t *op, Py_ssize_t count, uint64_t base, uint64_t stride,
                          const uint64_t *l, const uint64_t *k, uint32_t *z, uint8_t *o, Py_ssize_t n,
                          SlotAllocator versions_r, SlotAllocator versions_e) except -1:
    """``Sealer.open_reads`` on bound arrays: the number that failed, or RramError for a READ
    that is not one of the plan's (a bug, not a provider's doing)."""
    cdef Py_ssize_t j, bad = 0, stray = -1
    cdef uint64_t i, loc, version
    with nogil:
        for j in range(count):
            i = (op[j].local_addr - base) // stride
            if op[j].local_addr < base or i >= <uint64_t>n or op[j].local_addr != base + i * stride:
                stray = j
                break
            loc = l[i]
            if (loc & KIND_MASK) != KIND_STORED or loc_slab(loc) < FIRST_REMOTE_SLAB or op[j].length != loc_size(loc):
                stray = j
                break
            if versions_r._owner(loc, &version) != E_OK and versions_e._owner(loc, &version) != E_OK:
                version = 0  # no version: the open fails (and counts)
            if sealer.open_one(<uint8_t *><uintptr_t>op[j].local_addr, z[i], k[i], version):
                z[i] -= SEAL_TAG
                o[i] = 1
            else:
                o[i] = 0
                bad += 1
    if stray >= 0:
        raise RramError(f"READ {stray} of {count} does not match the planned batch (address or length)")
    return bad


cdef class PlannedReads:
    """The sealed pages of one planned get batch, opened as their READs land.

    ``start`` binds the batch's arrays once; ``landed(ops, start, end)`` (run_routed's
    ``on_done``, once a link or a chunk of it) then opens the pages of ``ops[start:end]`` as
    ``Sealer.open_reads`` does, with one buffer to look at per call instead of six, since the
    fast path calls it for every ~64 KiB a provider sends.  ``ops`` is a link's whole op array
    (RemoteTier's, allocated once a link): the address of the last one seen is kept, with a
    reference to it, so a chunk costs no buffer export (numpy builds a structured array's format
    for each, ~3 us).  ``bad``: pages that failed since ``start``.  The arrays must stay alive
    and unmoved until the batch is done (the store's scratch arrays and the tier's op arrays do).
    """
    cdef Sealer sealer
    cdef SlotAllocator versions_r, versions_e
    cdef uint64_t base, stride
    cdef object refs  # the bound arrays, kept alive
    cdef const uint64_t *l
    cdef const uint64_t *k
    cdef uint32_t *z
    cdef uint8_t *o
    cdef Py_ssize_t n
    cdef object ops  # the op array last landed from, kept alive, and its address and length
    cdef const op_t *op
    cdef Py_ssize_t nops
    cdef readonly Py_ssize_t bad

    def __cinit__(self, Sealer sealer, uint64_t base, uint64_t stride, SlotAllocator versions_r,
                  SlotAllocator versions_e):
        _check_plan(versions_r, versions_e, stride)
        self.sealer, self.base, self.stride = sealer, base, stride
        self.versions_r, self.versions_e = versions_r, versions_e
        self.n = 0
        self.nops = 0

    def start(self, locs, keys, sizes, ok, Py_ssize_t n):
        """A new batch of n pages: locs/keys (uint64) planned, sizes (uint32, their stored sizes,
        cut to the images' as pages open), ok (uint8, set per page opened)."""
        self.l = _u64(locs, n, "locs")
        self.k = _u64(keys, n, "keys")
        self.z = <uint32_t *>_buf(sizes, 4, n, True, "sizes")
        self.o = <uint8_t *>_buf(ok, 1, n, True, "ok")
        self.refs = (locs, keys, sizes, ok)
        self.n, self.bad = n, 0

    def landed(self, ops, Py_ssize_t start=0, Py_ssize_t end=-1):
        """Open the pages of ``ops[start:end]`` (READs of this batch that completed; ``end`` -1:
        to the end of ``ops``); returns how many failed."""
        cdef Py_buffer b
        cdef Py_ssize_t bad
        if ops is not self.ops:
            PyObject_GetBuffer(ops, &b, PyBUF_C_CONTIGUOUS)
            try:
                if b.itemsize != sizeof(op_t):
                    raise ValueError(f"ops: need {sizeof(op_t)}-byte items, got {b.itemsize}")
                self.op, self.nops = <const op_t *>b.buf, b.len // sizeof(op_t)
            finally:
                PyBuffer_Release(&b)
            self.ops = ops
        if end < 0:
            end = self.nops
        if start < 0 or start > end or end > self.nops:
            raise ValueError(f"ops[{start}:{end}] is not within its {self.nops} ops")
        bad = _open_ops(self.sealer, self.op + start, end - start, self.base, self.stride,
                        self.l, self.k, self.z, self.o, self.n, self.versions_r, self.versions_e)
        self.bad += bad
        return bad
