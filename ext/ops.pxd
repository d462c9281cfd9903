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

# opcodes (rram.transport.base OP_READ/OP_WRITE) and the ibv_wc_status values the software
# executors report (the verbs transport gets the rest from the device)
cdef enum:
    OP_READ = 0
    OP_WRITE = 1
    WC_SUCCESS = 0
    WC_LOC_PROT_ERR = 4
    WC_WR_FLUSH_ERR = 5       # these three (and a remote access error) suspend the provider (remote.LINK_FAILURE_STATUSES)
    WC_RETRY_EXC_ERR = 12
    WC_FATAL_ERR = 19
    WC_REM_INV_REQ_ERR = 9
    WC_REM_ACCESS_ERR = 10
