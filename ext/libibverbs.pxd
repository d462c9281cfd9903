# Declarations of the libibverbs subset rram uses (rdma-core's infiniband/verbs.h).
#
# pyverbs does not install its .pxd files, so we declare what we call.  Only fields we read
# or write are listed; Cython never needs a struct's full layout, the C compiler has it.
# Several "functions" below are macros or static inlines in verbs.h (ibv_query_port,
# ibv_reg_mr, ibv_post_send, ibv_poll_cq, ibv_req_notify_cq): calling them by name is right.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "infiniband/verbs.h" nogil:

    # -- devices and contexts --------------------------------------------------------------
    struct ibv_device:
        pass

    struct ibv_context:
        int num_comp_vectors

    ibv_device** ibv_get_device_list(int* num_devices)
    void ibv_free_device_list(ibv_device** devices)
    const char* ibv_get_device_name(ibv_device* device)
    ibv_context* ibv_open_device(ibv_device* device)
    int ibv_close_device(ibv_context* context)

    enum ibv_port_state:
        IBV_PORT_NOP
        IBV_PORT_DOWN
        IBV_PORT_INIT
        IBV_PORT_ARMED
        IBV_PORT_ACTIVE
        IBV_PORT_ACTIVE_DEFER

    enum ibv_mtu:
        IBV_MTU_256
        IBV_MTU_512
        IBV_MTU_1024
        IBV_MTU_2048
        IBV_MTU_4096

    enum:
        IBV_LINK_LAYER_UNSPECIFIED
        IBV_LINK_LAYER_INFINIBAND
        IBV_LINK_LAYER_ETHERNET

    struct ibv_port_attr:
        ibv_port_state state
        ibv_mtu max_mtu
        ibv_mtu active_mtu
        int gid_tbl_len
        uint16_t lid
        uint8_t link_layer

    int ibv_query_port(ibv_context* context, uint8_t port_num, ibv_port_attr* port_attr)

    union ibv_gid:
        uint8_t raw[16]

    int ibv_query_gid(ibv_context* context, uint8_t port_num, int index, ibv_gid* gid)

    struct ibv_device_attr:
        int max_qp_wr
        int max_cqe
        int max_mr
        int max_mw
        uint64_t max_mr_size
        uint8_t max_qp_rd_atom
        unsigned int device_cap_flags

    enum ibv_device_cap_flags:
        IBV_DEVICE_MEM_WINDOW
        IBV_DEVICE_MEM_WINDOW_TYPE_2A
        IBV_DEVICE_MEM_WINDOW_TYPE_2B

    int ibv_query_device(ibv_context* context, ibv_device_attr* device_attr)

    # -- protection domains and memory regions --------------------------------------------
    struct ibv_pd:
        ibv_context* context

    ibv_pd* ibv_alloc_pd(ibv_context* context)
    int ibv_dealloc_pd(ibv_pd* pd)

    enum ibv_access_flags:
        IBV_ACCESS_LOCAL_WRITE
        IBV_ACCESS_REMOTE_WRITE
        IBV_ACCESS_REMOTE_READ
        IBV_ACCESS_MW_BIND

    struct ibv_mr:
        void* addr
        size_t length
        uint32_t lkey
        uint32_t rkey

    ibv_mr* ibv_reg_mr(ibv_pd* pd, void* addr, size_t length, int access)
    int ibv_dereg_mr(ibv_mr* mr)

    # -- memory windows: a type-2 window is bound by a work request to one QP -------------
    enum ibv_mw_type:
        IBV_MW_TYPE_1
        IBV_MW_TYPE_2

    struct ibv_mw:
        uint32_t rkey
        ibv_mw_type type

    struct ibv_mw_bind_info:
        ibv_mr* mr
        uint64_t addr
        uint64_t length
        unsigned int mw_access_flags

    ibv_mw* ibv_alloc_mw(ibv_pd* pd, ibv_mw_type type)
    int ibv_dealloc_mw(ibv_mw* mw)

    # -- completion queues ----------------------------------------------------------------
    struct ibv_comp_channel:
        int fd

    ibv_comp_channel* ibv_create_comp_channel(ibv_context* context)
    int ibv_destroy_comp_channel(ibv_comp_channel* channel)

    struct ibv_cq:
        int cqe

    ibv_cq* ibv_create_cq(ibv_context* context, int cqe, void* cq_context,
                          ibv_comp_channel* channel, int comp_vector)
    int ibv_destroy_cq(ibv_cq* cq)
    int ibv_req_notify_cq(ibv_cq* cq, int solicited_only)
    int ibv_get_cq_event(ibv_comp_channel* channel, ibv_cq** cq, void** cq_context)
    void ibv_ack_cq_events(ibv_cq* cq, unsigned int nevents)

    enum ibv_wc_status:
        IBV_WC_SUCCESS
        IBV_WC_WR_FLUSH_ERR

    const char* ibv_wc_status_str(ibv_wc_status status)

    struct ibv_wc:
        uint64_t wr_id
        ibv_wc_status status
        uint32_t vendor_err
        uint32_t qp_num

    int ibv_poll_cq(ibv_cq* cq, int num_entries, ibv_wc* wc)

    # -- queue pairs ----------------------------------------------------------------------
    enum ibv_qp_type:
        IBV_QPT_RC

    enum ibv_qp_state:
        IBV_QPS_RESET
        IBV_QPS_INIT
        IBV_QPS_RTR
        IBV_QPS_RTS
        IBV_QPS_SQD
        IBV_QPS_SQE
        IBV_QPS_ERR

    enum ibv_qp_attr_mask:
        IBV_QP_STATE
        IBV_QP_ACCESS_FLAGS
        IBV_QP_PKEY_INDEX
        IBV_QP_PORT
        IBV_QP_AV
        IBV_QP_PATH_MTU
        IBV_QP_TIMEOUT
        IBV_QP_RETRY_CNT
        IBV_QP_RNR_RETRY
        IBV_QP_RQ_PSN
        IBV_QP_MAX_QP_RD_ATOMIC
        IBV_QP_MIN_RNR_TIMER
        IBV_QP_SQ_PSN
        IBV_QP_MAX_DEST_RD_ATOMIC
        IBV_QP_DEST_QPN

    struct ibv_qp_cap:
        uint32_t max_send_wr
        uint32_t max_recv_wr
        uint32_t max_send_sge
        uint32_t max_recv_sge
        uint32_t max_inline_data

    struct ibv_qp_init_attr:
        void* qp_context
        ibv_cq* send_cq
        ibv_cq* recv_cq
        ibv_qp_cap cap
        ibv_qp_type qp_type
        int sq_sig_all

    struct ibv_qp:
        uint32_t qp_num
        ibv_qp_state state

    struct ibv_global_route:
        ibv_gid dgid
        uint32_t flow_label
        uint8_t sgid_index
        uint8_t hop_limit
        uint8_t traffic_class

    struct ibv_ah_attr:
        ibv_global_route grh
        uint16_t dlid
        uint8_t sl
        uint8_t src_path_bits
        uint8_t static_rate
        uint8_t is_global
        uint8_t port_num

    struct ibv_qp_attr:
        ibv_qp_state qp_state
        ibv_mtu path_mtu
        uint32_t rq_psn
        uint32_t sq_psn
        uint32_t dest_qp_num
        unsigned int qp_access_flags
        ibv_ah_attr ah_attr
        uint16_t pkey_index
        uint8_t max_rd_atomic
        uint8_t max_dest_rd_atomic
        uint8_t min_rnr_timer
        uint8_t port_num
        uint8_t timeout
        uint8_t retry_cnt
        uint8_t rnr_retry

    ibv_qp* ibv_create_qp(ibv_pd* pd, ibv_qp_init_attr* qp_init_attr)
    int ibv_modify_qp(ibv_qp* qp, ibv_qp_attr* attr, int attr_mask)
    int ibv_destroy_qp(ibv_qp* qp)

    # -- work requests --------------------------------------------------------------------
    enum ibv_wr_opcode:
        IBV_WR_RDMA_WRITE
        IBV_WR_RDMA_READ
        IBV_WR_LOCAL_INV
        IBV_WR_BIND_MW

    enum ibv_send_flags:
        IBV_SEND_SIGNALED

    struct ibv_sge:
        uint64_t addr
        uint32_t length
        uint32_t lkey

    # the anonymous structs/union inside ibv_send_wr: only member access is generated
    struct _ibv_rdma_wr "rdma":
        uint64_t remote_addr
        uint32_t rkey

    union _ibv_wr_union "wr":
        _ibv_rdma_wr rdma

    struct _ibv_bind_mw_wr "bind_mw":
        ibv_mw* mw
        uint32_t rkey
        ibv_mw_bind_info bind_info

    struct ibv_send_wr:
        uint64_t wr_id
        ibv_send_wr* next
        ibv_sge* sg_list
        int num_sge
        ibv_wr_opcode opcode
        unsigned int send_flags
        uint32_t invalidate_rkey        # in an anonymous union with imm_data
        _ibv_wr_union wr
        _ibv_bind_mw_wr bind_mw         # in an anonymous union with tso

    int ibv_post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr)
