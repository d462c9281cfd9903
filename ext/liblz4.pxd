# Declarations of the liblz4 block API (lz4.h) that rram uses; no code here.
cdef extern from "lz4.h" nogil:
    int LZ4_versionNumber()
    const char* LZ4_versionString()
    int LZ4_compressBound(int inputSize)

    # Opaque here; its size is known to the C compiler (a stack object is fine).
    ctypedef struct LZ4_stream_t:
        pass
    LZ4_stream_t* LZ4_initStream(void* buffer, size_t size)
    int LZ4_compress_fast_continue(LZ4_stream_t* stream, const char* src, char* dst,
                                   int srcSize, int dstCapacity, int acceleration)

    # Returns the compressed length, or 0 when the result would not fit in dstCapacity.
    int LZ4_compress_fast(const char* src, char* dst, int srcSize, int dstCapacity, int acceleration)

    # Returns the decompressed length, or a negative number on malformed input.
    int LZ4_decompress_safe(const char* src, char* dst, int compressedSize, int dstCapacity)
