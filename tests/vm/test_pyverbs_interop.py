"""rdma-core's own pyverbs, as an independent requester, reads and writes a region that our
provider transport registered; a wrong rkey and a deregistered region fail on its side too."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from rram.transport import verbs

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("rdma_devices")]
pv = pytest.importorskip("pyverbs.qp", reason="pyverbs (python3-pyverbs) is not installed")
from pyverbs.addr import GID, AHAttr, GlobalRoute  # noqa: E402
from pyverbs.cq import CQ  # noqa: E402
from pyverbs.device import Context  # noqa: E402
from pyverbs.mr import MR  # noqa: E402
from pyverbs.pd import PD  # noqa: E402
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr  # noqa: E402
from pyverbs.wr import SGE, SendWR  # noqa: E402

try:
    import pyverbs.libibverbs_enums as e  # rdma-core >= 50
except ImportError:
    import pyverbs.enums as e  # rdma-core 44 (Debian 12)

PAGE = 4096
WC_REM_ACCESS_ERR = 10


class PyverbsRequester:
    """A requester written with pyverbs only: its own context, PD, MR, CQ and RC QP."""

    def __init__(self, device: str):
        self.ctx = Context(name=device)
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 16)
        self.mr = MR(self.pd, 4 * PAGE, e.IBV_ACCESS_LOCAL_WRITE)
        cap = QPCap(max_send_wr=16, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        self.qp = QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=1))
        self.gid = self.ctx.query_gid(1, 0)
        self.mtu = self.ctx.query_port(1).active_mtu
        self.psn = 4242

    def params(self) -> dict:
        return {"transport": "verbs", "qpn": self.qp.qp_num, "psn": self.psn,
                "gid": str(self.gid).replace(":", ""), "mtu": int(self.mtu), "lid": 0}

    def connect(self, reply: dict) -> None:
        a = QPAttr(port_num=1)
        a.path_mtu = min(int(reply["mtu"]), int(self.mtu))
        a.dest_qp_num = reply["qpn"]
        a.rq_psn = reply["psn"]
        a.sq_psn = self.psn
        a.max_dest_rd_atomic = a.max_rd_atomic = 16
        a.min_rnr_timer, a.timeout, a.retry_cnt, a.rnr_retry = 12, 16, 7, 7
        g = reply["gid"]
        dgid = GID(":".join(g[i:i + 4] for i in range(0, 32, 4)))
        a.ah_attr = AHAttr(gr=GlobalRoute(dgid=dgid, sgid_index=0), is_global=1, port_num=1)
        self.qp.to_rts(a)

    def rdma(self, opcode, local_off: int, remote_addr: int, rkey: int) -> int:
        """One signalled op; returns the work completion status."""
        wr = SendWR(opcode=opcode, num_sge=1, sg=[SGE(self.mr.buf + local_off, PAGE, self.mr.lkey)])
        wr.set_wr_rdma(rkey, remote_addr)
        self.qp.post_send(wr)
        for _ in range(2_000_000):
            n, wcs = self.cq.poll()
            if n:
                return wcs[0].status
        raise AssertionError("no completion from pyverbs")

    def close(self):
        for obj in (self.qp, self.mr, self.cq, self.pd, self.ctx):
            obj.close()


@pytest.fixture
def setup(device_pair):
    provider = verbs.ProviderTransportImpl(device=device_pair[1])
    session = provider.open_session("pyverbs")
    region = np.zeros(16 * PAGE, dtype=np.uint8)
    rkey = session.register(region.ctypes.data, region.size)
    peer = PyverbsRequester(device_pair[0])
    peer.connect(session.accept(peer.params()))
    yield session, region, rkey, peer
    peer.close()
    provider.close()


def test_pyverbs_writes_and_reads_our_region(setup):
    session, region, rkey, peer = setup
    page = bytes(np.random.default_rng(3).integers(0, 256, PAGE, dtype=np.uint8))
    peer.mr.write(page, PAGE, 0)
    assert peer.rdma(e.IBV_WR_RDMA_WRITE, 0, region.ctypes.data + 5 * PAGE, rkey) == e.IBV_WC_SUCCESS
    assert zlib.crc32(region[5 * PAGE : 6 * PAGE]) == zlib.crc32(page)
    assert not region[: 5 * PAGE].any() and not region[6 * PAGE :].any()

    region[9 * PAGE : 10 * PAGE] = np.frombuffer(page[::-1], dtype=np.uint8)
    assert peer.rdma(e.IBV_WR_RDMA_READ, PAGE, region.ctypes.data + 9 * PAGE, rkey) == e.IBV_WC_SUCCESS
    assert zlib.crc32(peer.mr.read(PAGE, PAGE)) == zlib.crc32(page[::-1])


def test_pyverbs_wrong_rkey_is_refused(setup):
    session, region, rkey, peer = setup
    peer.mr.write(b"\xff" * PAGE, PAGE, 0)
    assert peer.rdma(e.IBV_WR_RDMA_WRITE, 0, region.ctypes.data, rkey ^ 0x4321) == WC_REM_ACCESS_ERR
    assert not region.any()


def test_pyverbs_cannot_touch_a_deregistered_region(setup):
    session, region, rkey, peer = setup
    session.deregister(rkey)
    peer.mr.write(b"\xee" * PAGE, PAGE, 0)
    assert peer.rdma(e.IBV_WR_RDMA_WRITE, 0, region.ctypes.data, rkey) == WC_REM_ACCESS_ERR
    assert not region.any()
