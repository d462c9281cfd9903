# The C layout of a batch's operations and completions, shared by _regions, _tcpwire, _storepath and _verbs.
# Mirrors rram.transport.base.OP_DTYPE (32 bytes) and COMPLETION_DTYPE (16 bytes).
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

cdef packed struct op_t:
    uint64_t local_addr
    uint64_t remote_addr
    uint32_t length
    uint32_t lkey
    uint32_t rkey
    uint8_t opcode
    uint8_t pad[3]

cdef packed struct completion_t:
    uint64_t batch_id
    int32_t status
    uint32_t index
