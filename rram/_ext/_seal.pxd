# Declarations of the page seal (_seal.pyx), so that other compiled modules (the request path,
# ext/_reqpath.pyx) seal and open single pages through its C methods without the GIL.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef enum:
    SEAL_TAG = 16            # bytes a sealed page is longer than its stored image (the GCM tag)
    SEAL_STRIDE = 4160       # room for one sealed image (4096 + SEAL_TAG, rounded up to 64 bytes)


cdef class Sealer:
    cdef void *enc                    # gcry_cipher_hd_t, keyed once (AES-256-GCM)
    cdef void *dec
    cdef readonly uint64_t requester  # bound into every page's associated data
    cdef readonly uint64_t next_version
    cdef readonly uint64_t sealed     # since creation: pages sealed, pages opened, tags that failed
    cdef readonly uint64_t opened
    cdef readonly uint64_t failures   # tags that failed on an open that counts (see open_one)

    # Not thread-safe: callers hold the page store's lock (the request path holds its StoreLock).
    # One page: ``size`` bytes at ``src`` -> ciphertext + tag (size + SEAL_TAG bytes) at ``dst``
    # (may equal src).  0, or -1 if libgcrypt failed.
    cdef int seal_one(self, const uint8_t *src, uint8_t *dst, uint32_t size, uint64_t key,
                      uint64_t version) noexcept nogil
    # One sealed image of ``sealed_size`` bytes at ``buf`` (the remote location's size), opened in
    # place: 1 when the tag verifies for (key, version) (buf then holds sealed_size - SEAL_TAG
    # plaintext bytes), 0 when not (those bytes zeroed; the caller reads another replica).
    # ``version``: the remote allocator's owner word of that location (SlotAllocator._owner in
    # rram/_ext/_slab.pxd on PageStore.remote_alloc; the sealer is PageStore.seal.sealer).
    # A version taken (take_version) must be used for one seal only: it is the GCM nonce.
    # ``count``: a failure adds to ``failures`` (the store's seal_failures); False where the caller
    # only declines and the Python path reads that copy again, which counts it (the request path).
    cdef int open_one(self, uint8_t *buf, uint32_t sealed_size, uint64_t key, uint64_t version,
                      bint count=*) noexcept nogil
    cdef uint64_t take_version(self) noexcept nogil
