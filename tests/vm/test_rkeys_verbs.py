"""Rkeys are revoked when their lease ends, die with a requester that is declared gone, and
(where the device has type-2 memory windows) work only on the QP they were bound to.

The probe records what the guest's kernel and rdma-core really offer (run with ``-s`` to see
it); the transport tests check windows through ext/_verbs; the provider tests hold a lease's
(addr, rkey) as a requester would and try them, over real verbs, against a real provider
process after the lease was freed and after the requester was declared gone.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zlib

import numpy as np
import pytest

from rram import errors
from rram.testing.cluster import LocalCluster
from rram.transport import OP_READ, OP_WRITE, new_ops, verbs
from tests.conftest import require_or_skip

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("rdma_devices")]
PAGE = 4096
LEASE = 1 << 20


def crc(a) -> int:
    return zlib.crc32(memoryview(a).cast("B"))


def probe(name: str) -> dict:
    """What device ``name`` says about memory windows, and what allocating them does."""
    from rram._ext import _verbs

    out = {"kernel": os.uname().release, "device": name}
    with _verbs.Context(name) as ctx:
        attr = ctx.query_device()
        flags = attr["device_cap_flags"]
        out.update(device_cap_flags=hex(flags), max_mw=attr["max_mw"],
                   MEM_WINDOW=bool(flags & _verbs.DEVICE_MEM_WINDOW),
                   MEM_WINDOW_TYPE_2A=bool(flags & _verbs.DEVICE_MEM_WINDOW_TYPE_2A),
                   MEM_WINDOW_TYPE_2B=bool(flags & _verbs.DEVICE_MEM_WINDOW_TYPE_2B))
        with _verbs.PD(ctx) as pd:
            try:
                mw = _verbs.MW(pd)
                out["alloc_mw_type2"] = f"ok, rkey {mw.rkey:#x}"
                mw.close()
            except errors.RramError as exc:
                out["alloc_mw_type2"] = f"failed: {exc}"
    try:  # pyverbs, independently of our extension: type 1 too
        from pyverbs.device import Context as PvContext
        from pyverbs.enums import IBV_MW_TYPE_1, IBV_MW_TYPE_2
        from pyverbs.mr import MW as PvMW
        from pyverbs.pd import PD as PvPD

        with PvContext(name=name) as pctx, PvPD(pctx) as ppd:
            for label, kind in (("pyverbs_alloc_mw_type1", IBV_MW_TYPE_1), ("pyverbs_alloc_mw_type2", IBV_MW_TYPE_2)):
                try:
                    with PvMW(ppd, kind) as mw:
                        out[label] = f"ok, rkey {mw.rkey:#x}"
                except Exception as exc:  # noqa: BLE001 - recorded, not judged
                    out[label] = f"failed: {exc}"
    except ImportError as exc:
        out["pyverbs"] = f"not importable: {exc}"
    return out


def test_probe_memory_windows(rdma_devices):
    """Records the facts; the provider's runtime choice must agree with them."""
    facts = [probe(name) for name in rdma_devices]
    for f in facts:
        print("memory-window probe:", json.dumps(f, sort_keys=True))
    provider = verbs.ProviderTransportImpl(device=rdma_devices[0])
    try:
        print("provider choice:", "windows" if provider.windows else f"MR rkeys ({provider.window_reason})")
        has = facts[0]["MEM_WINDOW_TYPE_2B"] or facts[0]["MEM_WINDOW_TYPE_2A"]
        assert provider.windows == (has and facts[0]["alloc_mw_type2"].startswith("ok"))
        # the soft-RoCE guest (RRAM_REQUIRE_RDMA=1) has them: there a missing window fails
        require_or_skip(None if provider.windows else f"no type-2 memory windows here: {provider.window_reason}")
    finally:
        provider.close()


# -- windows through the transport ------------------------------------------------------------


class Peer:
    """A requester endpoint with a local buffer, connected to provider session ``session``."""

    def __init__(self, requester, session, pages=16):
        self.session = session
        self.ep = requester.endpoint()
        self.ep.connect(session.accept(self.ep.local_params()))
        self.ep.reconnect_params = session.accept
        self.local = np.zeros(pages * PAGE, dtype=np.uint8)
        self.lkey = self.ep.register_local(self.local.ctypes.data, self.local.size)

    def run(self, opcode, remote_addr, rkey, npages=1, timeout=10.0):
        ops = new_ops(npages)
        ops["local_addr"] = self.local.ctypes.data + np.arange(npages, dtype=np.uint64) * PAGE
        ops["remote_addr"] = remote_addr + np.arange(npages, dtype=np.uint64) * PAGE
        ops["length"] = PAGE
        ops["lkey"] = self.lkey
        ops["rkey"] = rkey
        ops["opcode"] = opcode
        self.ep.execute(ops, 1, timeout=timeout)

    def refused(self, opcode, remote_addr, rkey, recover=True):
        """The operation fails with a remote access error; the endpoint recovers (a new QP)."""
        with pytest.raises(errors.RemoteAccessError):
            self.run(opcode, remote_addr, rkey)
        if recover:
            self.ep.recover()


@pytest.fixture
def window_sides(device_pair):
    provider = verbs.ProviderTransportImpl(device=device_pair[1])
    requester = verbs.RequesterTransportImpl(device=device_pair[0])
    if not provider.windows:
        requester.close()
        provider.close()
        require_or_skip(f"no type-2 memory windows: {provider.window_reason}")
    yield provider, requester
    requester.close()
    provider.close()


def test_a_window_rkey_works_only_on_the_qp_it_is_bound_to(window_sides):
    provider, requester = window_sides
    session = provider.open_session("windows")
    remote = np.zeros(8 * PAGE, dtype=np.uint8)
    rkey = session.register(remote.ctypes.data, remote.size)
    first = Peer(requester, session)
    first.local[:PAGE] = 7
    first.run(OP_WRITE, remote.ctypes.data, rkey)
    assert crc(remote[:PAGE]) == crc(first.local[:PAGE])

    # a second QP of the same session (same PD): the window moves to it, the first loses it
    second = Peer(requester, session)
    second.run(OP_READ, remote.ctypes.data, rkey)
    assert crc(second.local[:PAGE]) == crc(remote[:PAGE])
    first.local[:PAGE] = 0xAA
    first.refused(OP_WRITE, remote.ctypes.data + PAGE, rkey, recover=False)
    assert not remote[PAGE : 2 * PAGE].any(), "a refused WRITE landed"
    first.ep.close()
    # the windows follow the QP accepted last: a third QP takes them, second's successor
    # (recover: a new QP replacing the old) takes them back and leaves the third unbound
    third = Peer(requester, session)
    second.ep.recover()
    third.local[:PAGE] = 0xAA
    third.refused(OP_READ, remote.ctypes.data, rkey, recover=False)
    assert (third.local[:PAGE] == 0xAA).all(), "a refused READ delivered bytes"
    third.ep.close()
    second.run(OP_READ, remote.ctypes.data, rkey)
    assert crc(second.local[:PAGE]) == crc(remote[:PAGE])

    # recover() on the bound QP keeps the rkey: the window follows the successor QP
    second.refused(OP_READ, remote.ctypes.data + remote.size, rkey)  # past the end: QP to error
    remote[:PAGE] = 3
    second.run(OP_READ, remote.ctypes.data, rkey)
    assert crc(second.local[:PAGE]) == crc(remote[:PAGE])

    # invalidated (deregistered): refused on the bound QP too
    session.deregister(rkey)
    second.refused(OP_READ, remote.ctypes.data, rkey)
    second.local[:PAGE] = 9
    second.refused(OP_WRITE, remote.ctypes.data, rkey)
    assert crc(remote[:PAGE]) == crc(np.full(PAGE, 3, np.uint8))
    assert provider.stats()["rkeys"] == "window"
    second.ep.close()
    session.close()


# -- a real provider process ------------------------------------------------------------------


class Holder:
    """A requester as the store is one: control client + verbs endpoint to provider p0."""

    def __init__(self, cluster, name, device):
        self.client = cluster.client("p0", name)
        self.transport = verbs.RequesterTransportImpl(device=device)
        ep = self.transport.endpoint()
        ep.connect(self.client.connect_data(ep.local_params()))
        ep.reconnect_params = self.client.connect_data
        self.ep = ep
        self.local = np.zeros(4 * PAGE, dtype=np.uint8)
        self.lkey = ep.register_local(self.local.ctypes.data, self.local.size)

    run = Peer.run
    refused = Peer.refused

    def close(self):
        self.ep.close()
        self.transport.close()
        self.client.close()


def kernel_mrs() -> list[dict] | None:
    """Every MR the kernel holds (``rdma -j resource show mr``), None without the tool."""
    if shutil.which("rdma") is None:
        return None
    res = subprocess.run(["rdma", "-j", "resource", "show", "mr"], capture_output=True, text=True)
    print("rdma -j resource show mr:", res.returncode, res.stdout.strip()[:2000], res.stderr.strip()[:300])
    try:
        mrs = json.loads(res.stdout) if res.returncode == 0 else None
    except ValueError:
        return None
    return [mr for mr in mrs if isinstance(mr, dict)] if isinstance(mrs, list) else None


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def cluster(tmp_path):
    with LocalCluster(n_providers=1, capacity="64MiB", transport="verbs", workdir=str(tmp_path),
                      lease_grace=2.0) as c:
        yield c


def test_a_freed_lease_rkey_reads_and_writes_nothing(cluster, rdma_devices):
    alice = Holder(cluster, "alice", rdma_devices[-1])
    try:
        kept, freed = alice.client.alloc_slab(LEASE), alice.client.alloc_slab(LEASE)
        alice.local[:PAGE] = 0x5A
        alice.run(OP_WRITE, kept.region.addr, kept.region.rkey)
        alice.run(OP_WRITE, freed.region.addr, freed.region.rkey)
        alice.local[:PAGE] = 0
        alice.run(OP_READ, freed.region.addr, freed.region.rkey)
        assert (alice.local[:PAGE] == 0x5A).all()

        alice.client.free_slab(freed)
        alice.local[:PAGE] = 0xAA
        alice.refused(OP_READ, freed.region.addr, freed.region.rkey)
        assert (alice.local[:PAGE] == 0xAA).all(), "a READ with a freed rkey delivered bytes"
        alice.refused(OP_WRITE, freed.region.addr, freed.region.rkey)
        # nor does the old rkey reach the lease kept, or the next lease (likely at the same address)
        fresh = alice.client.alloc_slab(LEASE)
        alice.local[:PAGE] = 0xEE
        alice.refused(OP_WRITE, kept.region.addr, freed.region.rkey)
        alice.refused(OP_WRITE, fresh.region.addr, freed.region.rkey)
        alice.run(OP_READ, kept.region.addr, kept.region.rkey)
        assert (alice.local[:PAGE] == 0x5A).all(), "the kept lease was altered"
        alice.run(OP_READ, fresh.region.addr, fresh.region.rkey)
        assert not alice.local[:PAGE].any(), "the new lease was written through the old rkey"
        mode = cluster.provider_stats()["p0"]["transport_stats"]["rkeys"]
        print(f"provider rkeys: {mode}; freed lease at {freed.region.addr:#x}, next at {fresh.region.addr:#x}")
    finally:
        alice.close()


def test_a_gone_requesters_rkeys_die_with_it_and_others_never_worked(cluster, rdma_devices):
    alice = Holder(cluster, "alice", rdma_devices[-1])
    bob = Holder(cluster, "bob", rdma_devices[-1])
    try:
        lease = alice.client.alloc_slab(LEASE)
        bobs = bob.client.alloc_slab(LEASE)
        alice.local[:PAGE] = 0x11
        alice.run(OP_WRITE, lease.region.addr, lease.region.rkey)
        bob.local[:PAGE] = 0x22
        bob.run(OP_WRITE, bobs.region.addr, bobs.region.rkey)

        # another requester's QP (another PD) cannot use alice's rkey, nor alice bob's
        bob.local[:PAGE] = 0xAA
        bob.refused(OP_READ, lease.region.addr, lease.region.rkey)
        assert (bob.local[:PAGE] == 0xAA).all()
        bob.refused(OP_WRITE, lease.region.addr, lease.region.rkey)
        alice.local[:PAGE] = 0xAB
        alice.refused(OP_WRITE, bobs.region.addr, bobs.region.rkey)
        mrs_before = kernel_mrs()

        # alice's control connection drops without bye; after lease_grace she is declared gone
        alice.client._hangup()
        wait_for(lambda: cluster.provider_stats()["p0"]["counters"]["sessions_expired"] >= 1, 30,
                 "alice's session to expire")
        stats = cluster.provider_stats()["p0"]
        assert [s["requester"] for s in stats["per_session"] if s["requester"] == "alice"] == []
        assert stats["transport_stats"]["regions"] == 1  # bob's
        mrs_after = kernel_mrs()
        if mrs_before is not None:  # the kernel's own account: the 1 MiB MRs are the two leases
            # (its "pid" is the registering thread's: each control connection has its own)
            mine = [mr for mr in mrs_before if mr.get("mrlen") == LEASE]
            left = [mr for mr in mrs_after if mr.get("mrlen") == LEASE]
            assert len(mine) == 2 and len(left) == 1, (mrs_before, mrs_after)
            if stats["transport_stats"]["rkeys"] == "window":  # the MR itself grants no remote access
                assert all(mr.get("rkey") == "0" for mr in mine), mine
        # her old QP's partner is gone (no reply: retries run out or time out)
        alice.local[:PAGE] = 0xAA
        with pytest.raises(errors.TransportError):
            alice.run(OP_READ, lease.region.addr, lease.region.rkey, timeout=5)
        assert (alice.local[:PAGE] == 0xAA).all()
        # back as a new session (a new PD): the old rkey is dead there too
        again = Holder(cluster, "alice", rdma_devices[-1])
        try:
            again.local[:PAGE] = 0xAA
            again.refused(OP_READ, lease.region.addr, lease.region.rkey)
            assert (again.local[:PAGE] == 0xAA).all()
            again.refused(OP_WRITE, lease.region.addr, lease.region.rkey)
        finally:
            again.close()
        # bob was never disturbed
        bob.run(OP_READ, bobs.region.addr, bobs.region.rkey)
        assert (bob.local[:PAGE] == 0x22).all()
    finally:
        alice.ep.close()
        alice.transport.close()
        alice.client.close()
        bob.close()
