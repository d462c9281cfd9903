"""One-sided RDMA over libibverbs (RC queue pairs), through ext/_verbs.

Provider: one protection domain per requester session, so an rkey of one session is useless
on another session's QP; every registered region is its own MR, and ``deregister`` revokes its
rkey before it returns (ibv_dealloc_mw / ibv_dereg_mr: the device refuses the key from then on).
Where the device has type-2 memory windows (chosen at start, logged; soft-RoCE has them since
Linux 5.13), the MR is registered without remote access and the rkey handed out is that of a
window bound over it to the session's current QP: it works in requests arriving on that QP
only, not on another QP of the same PD.  A successor QP (``replaces``) gets the windows moved
to it with their keys unchanged (invalidate, then bind again), so the requester's rkeys stay
valid across ``recover()``.  Without windows the MR itself carries remote access (per-PD keys).
``accept(params)`` creates a QP, brings it to RTS towards the requester's QP and returns
its own parameters.  One-sided operations never reach the provider's CPU, so ``stats()``
counts sessions, connections and registered memory, not operations.

Requester: an endpoint is a PD + CQ + RC QP; ``register_local`` registers staging buffers
as MRs (lkeys); ``post`` hands a whole batch to the QP in one call, only the last work
request signalled.  After an error completion the QP is in error and so is the provider's
(a responder that NAKs an access goes to error too), so ``recover()`` replaces our QP with
a new one (same PD, so lkeys stay valid; a new QP number, so packets still in flight for the
old connection cannot land in the new one: soft-RoCE showed exactly that after resetting a
QP in place) and needs a fresh ``accept`` from the provider, which then closes the old
partner QP (``replaces`` in the parameters): set ``Endpoint.reconnect_params`` to a callable
doing the control exchange (``params -> reply``, e.g. the control client's ``connect``);
without it ``recover()`` raises ConnectionLost after the reset and the caller re-runs
``ep.connect(control.connect(ep.local_params()))`` itself.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import errors
from .base import COMPLETION_DTYPE, OP_DTYPE, Endpoint, ProviderSession, ProviderTransport, RequesterTransport

try:
    from .._ext import _verbs
except ImportError as exc:  # pragma: no cover - unavailable_reason() says why
    _verbs = None
    _import_error = str(exc)

log = logging.getLogger(__name__)

#: what a requester's QP may do to a provider's regions
REMOTE_ACCESS = 0 if _verbs is None else (
    _verbs.ACCESS_LOCAL_WRITE | _verbs.ACCESS_REMOTE_READ | _verbs.ACCESS_REMOTE_WRITE)
#: what a window grants (a window's MR is registered with only local write and bind access)
WINDOW_ACCESS = 0 if _verbs is None else _verbs.ACCESS_REMOTE_READ | _verbs.ACCESS_REMOTE_WRITE
WINDOW_MR_ACCESS = 0 if _verbs is None else _verbs.ACCESS_LOCAL_WRITE | _verbs.ACCESS_MW_BIND
#: ACK timeout exponent: 4.096 us * 2**16 = 268 ms, generous because soft-RoCE under an
#: emulated CPU can be slow to ACK; with 7 retries a vanished peer shows up in about 2 s
ACK_TIMEOUT = 16
RETRY_COUNT = 7
#: RoCE v2 carries the GRH hop limit as the IP TTL: 64 (Linux's default TTL) lets a
#: connection cross the routers between racks; 1 would confine it to one L2 segment
ROCE_HOP_LIMIT = 64


def _port_summary(ctx, port_num: int) -> dict:
    try:
        return ctx.query_port(port_num)
    except errors.TransportError as exc:
        return {"active": False, "error": str(exc)}


def unavailable_reason() -> str | None:
    """None when a device with an active port exists, else a sentence saying why not."""
    if _verbs is None:
        return (f"the verbs extension rram._ext._verbs is not built ({_import_error}); "
                "install libibverbs-dev and rebuild")
    names, reason = _verbs.device_names()
    if not names:
        return reason
    states = []
    for name in names:
        try:
            with _verbs.Context(name) as ctx:
                port = _port_summary(ctx, 1)
        except errors.TransportError as exc:
            states.append(f"{name}: {exc}")
            continue
        if port["active"]:
            return None
        states.append(f"{name} port 1 not active")
    return "no RDMA device has an active port (" + "; ".join(states) + ")"


class _Device:
    """An opened device port: the context, the port's MTU and our GID at ``gid_index``."""

    def __init__(self, device: str | None, gid_index: int, port_num: int):
        if _verbs is None:
            raise errors.TransportUnavailable(unavailable_reason())
        names, reason = _verbs.device_names()
        if not names:
            raise errors.TransportUnavailable(reason)
        candidates = [device] if device else names
        tried = []
        for name in candidates:
            ctx = _verbs.Context(name)
            port = _port_summary(ctx, port_num)
            if port["active"]:
                break
            tried.append(f"{name} port {port_num}: {port.get('error', 'not active')}")
            ctx.close()
        else:
            raise errors.TransportUnavailable("no usable RDMA port: " + "; ".join(tried))
        self.ctx = ctx
        self.name = name
        self.port_num = port_num
        self.gid_index = gid_index
        self.mtu = port["active_mtu"]
        self.lid = port["lid"]
        self.link_layer = port["link_layer"]
        try:
            self.gid = ctx.query_gid(port_num, gid_index)
            self.limits = ctx.query_device()
        except BaseException:
            ctx.close()
            raise
        if not any(self.gid):
            ctx.close()
            raise errors.TransportUnavailable(f"{name} port {port_num} has no GID at index {gid_index}")

    def params(self, qpn: int, psn: int) -> dict:
        """What the peer needs to reach our QP ``qpn`` (JSON-serialisable)."""
        return {"transport": "verbs", "qpn": qpn, "psn": psn, "gid": self.gid.hex(), "mtu": self.mtu,
                "lid": self.lid, "link_layer": self.link_layer}

    def connect(self, qp, my_psn: int, peer: dict, access: int) -> None:
        qpn, psn, gid, mtu = _parse_params(peer)
        av = address_vector(self.link_layer, self.gid_index, peer_lid=_peer_lid(peer), peer_gid=gid,
                            peer_link_layer=peer.get("link_layer", self.link_layer))
        qp.connect(qpn, psn, my_psn, dlid=av.dlid, dgid=av.dgid, sgid_index=av.sgid_index,
                   hop_limit=av.hop_limit, mtu=min(mtu, self.mtu), port_num=self.port_num,
                   access=access, max_rd_atomic=min(16, self.limits["max_qp_rd_atom"]),
                   timeout=ACK_TIMEOUT, retry_cnt=RETRY_COUNT)

    def close(self) -> None:
        self.ctx.close()


def window_support(dev: _Device) -> str | None:
    """None when ``dev`` has type-2 memory windows (cap flag set and one can be allocated),
    else why not."""
    flags = dev.limits["device_cap_flags"]
    if not flags & (_verbs.DEVICE_MEM_WINDOW_TYPE_2A | _verbs.DEVICE_MEM_WINDOW_TYPE_2B):
        return f"{dev.name} has no type-2 memory windows (device_cap_flags {flags:#x})"
    try:
        with _verbs.PD(dev.ctx) as pd:
            _verbs.MW(pd).close()
    except errors.RramError as exc:
        return f"{dev.name} advertises type-2 memory windows but ibv_alloc_mw fails: {exc}"
    return None


def _parse_params(p: dict) -> tuple[int, int, bytes, int]:
    """(qpn, psn, gid, mtu) from a peer's parameters; ProtocolError when they are malformed."""
    try:
        if p.get("transport", "verbs") != "verbs":
            raise ValueError(f"transport is {p.get('transport')!r}")
        qpn, psn, mtu = int(p["qpn"]), int(p["psn"]), int(p["mtu"])
        gid = bytes.fromhex(p["gid"])
        if not (0 < qpn < 1 << 24 and 0 <= psn < 1 << 24 and 1 <= mtu <= 5 and len(gid) == 16):
            raise ValueError("qpn/psn must be 24-bit, mtu an ibv_mtu value (1..5), gid 16 bytes")
        replaces = p.get("replaces")
        if replaces is not None and (isinstance(replaces, bool) or not isinstance(replaces, int)):
            raise ValueError(f"replaces must be the qpn of the QP it replaces, got {replaces!r:.40}")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # int(1e999): Overflow
        raise errors.ProtocolError(f"bad verbs connection parameters {p!r:.200}: {exc}") from exc
    return qpn, psn, gid, mtu


@dataclass(frozen=True)
class AddressVector:
    """How our QP reaches the peer's: the fields of ``ibv_ah_attr`` that differ by link layer.

    ``dgid`` is None when no GRH is sent (InfiniBand inside one subnet: LID routing)."""

    dlid: int
    dgid: bytes | None
    sgid_index: int
    hop_limit: int


def address_vector(link_layer: str, gid_index: int, *, peer_lid: int, peer_gid: bytes,
                   peer_link_layer: str, hop_limit: int = ROCE_HOP_LIMIT) -> AddressVector:
    """The address vector towards a peer port, from our port's link layer.

    InfiniBand switches forward by LID, so an IB peer is addressed by its LID (the subnet
    manager assigns it; 0 means none did) and no GRH.  RoCE has no LIDs: every packet carries
    a GRH whose destination GID is the peer's address (RoCE v2: an IP address), and the hop
    limit becomes the IP TTL, so it must let the packet cross routers between racks.
    """
    if link_layer != peer_link_layer:
        raise errors.ProtocolError(f"link layers differ: ours is {link_layer}, the peer's {peer_link_layer}")
    if link_layer == "infiniband":
        if not 0 < peer_lid < 0xC000:   # 0xC000.. are multicast LIDs, 0 is unassigned
            raise errors.ProtocolError(f"an InfiniBand peer needs a unicast LID, got {peer_lid} "
                                       "(is a subnet manager running on the fabric?)")
        return AddressVector(dlid=peer_lid, dgid=None, sgid_index=gid_index, hop_limit=hop_limit)
    if link_layer == "ethernet":
        if not any(peer_gid):
            raise errors.ProtocolError("a RoCE peer needs a GID, got all zeros")
        return AddressVector(dlid=0, dgid=peer_gid, sgid_index=gid_index, hop_limit=hop_limit)
    raise errors.ProtocolError(f"unsupported link layer {link_layer!r} (want infiniband or ethernet)")


def _peer_lid(p: dict) -> int:
    try:
        lid = int(p.get("lid", 0))
    except (TypeError, ValueError) as exc:
        raise errors.ProtocolError(f"bad LID in verbs connection parameters {p!r}") from exc
    if not 0 <= lid <= 0xFFFF:
        raise errors.ProtocolError(f"a LID is 16 bits, got {lid}")
    return lid


def _new_psn() -> int:
    return secrets.randbits(24)


# -- provider ----------------------------------------------------------------------------------


class VerbsSession(ProviderSession):
    """One requester's PD, its regions (one MR each, with a window when the provider uses
    windows) and the QPs accepted for it.  Windows are bound to ``bound``, the QP accepted last."""

    def __init__(self, provider: ProviderTransportImpl, session_id: str):
        self.provider = provider
        self.session_id = session_id
        dev = provider.device
        self._lock = threading.Lock()
        self.pd = _verbs.PD(dev.ctx)
        try:
            self.cq = _verbs.CQ(dev.ctx, 4)  # a responder of one-sided ops gets no completions
        except BaseException:
            self.pd.close()
            raise
        self.windows = provider.windows
        self.regions: dict[int, tuple] = {}  # rkey -> (MR, MW or None)
        self.qps: dict[tuple[int, str], object] = {}  # (peer qpn, peer gid) -> QP
        self.bound = None  # the QP windows are bound to
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise errors.TransportError(f"session {self.session_id} is closed")

    def register(self, addr: int, length: int) -> int:
        with self._lock:
            self._check_open()
            if addr <= 0 or length <= 0:
                raise errors.TransportError(f"cannot register region ({addr:#x}, {length}): empty or null")
            if not self.windows:
                mr = _verbs.MR(self.pd, addr, length, REMOTE_ACCESS)
                self.regions[mr.rkey] = (mr, None)
                return mr.rkey
            mr = _verbs.MR(self.pd, addr, length, WINDOW_MR_ACCESS)
            try:
                mw = _verbs.MW(self.pd)
            except BaseException:
                mr.close()
                raise
            self.regions[mw.rkey] = (mr, mw)
            if self.bound is not None:
                try:
                    self.bound.bind_mw(mw, mr, WINDOW_ACCESS)
                except errors.TransportError as exc:
                    # the requester's QP is in error (it must recover() before using any
                    # rkey): the next accept binds this window with the others
                    log.info("session %s: window %#x unbound until the next QP: %s", self.session_id, mw.rkey, exc)
            return mw.rkey

    def deregister(self, rkey: int) -> None:
        """Revoke ``rkey`` now: the window is freed (invalidated) and the MR deregistered."""
        with self._lock:
            region = self.regions.pop(rkey, None)
            if region is None:
                raise errors.NotFound(f"rkey {rkey:#x} is not registered in session {self.session_id}")
            region[0].close()  # a bound window goes first

    def _bind_windows(self, qp) -> None:
        """Move every window to ``qp`` (same rkeys): invalidate where bound, then bind."""
        for rkey, (mr, mw) in list(self.regions.items()):
            if mw.closed:  # its QP was closed before a successor existed: a new key
                mw = _verbs.MW(self.pd)
                del self.regions[rkey]
                self.regions[mw.rkey] = (mr, mw)
                log.warning("session %s: window %#x was lost with its QP; region now has rkey %#x",
                            self.session_id, rkey, mw.rkey)
            elif mw.qp is not None:
                qp.invalidate(mw)
            qp.bind_mw(mw, mr, WINDOW_ACCESS)

    def accept(self, peer_params: dict) -> dict:
        qpn, _, gid, _ = _parse_params(peer_params)
        replaces = peer_params.get("replaces")
        dev = self.provider.device
        with self._lock:
            self._check_open()
            # a requester that recovers comes back from a new QP: its old partner is in error
            # (closed once the windows have moved off it)
            retired = [old for old_qpn in {qpn, replaces}
                       if (old := self.qps.pop((old_qpn, gid.hex()), None)) is not None]
            try:
                cap = self.provider.max_session_connections
                if len(self.qps) >= cap:
                    raise errors.CapacityError(f"session already has {cap} QPs (limits.max_data_connections)")
                qp = _verbs.QP(self.pd, self.cq, 1, 1)
                psn = _new_psn()
                try:
                    dev.connect(qp, psn, peer_params, REMOTE_ACCESS)
                    if self.windows:
                        self._bind_windows(qp)
                except BaseException:
                    qp.close()
                    raise
                self.qps[(qpn, gid.hex())] = qp
                if self.windows:
                    self.bound = qp
            finally:
                for old in retired:
                    old.close()
            return dev.params(qp.qp_num, psn)

    def registered_bytes(self) -> int:
        return sum(mr.length for mr, _ in self.regions.values())

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.pd.close()  # windows, QPs and MRs first, then the PD: every rkey revoked
            self.regions.clear()
            self.qps.clear()
            self.bound = None
            self.cq.close()
        self.provider._drop(self)


class ProviderTransportImpl(ProviderTransport):
    name = "verbs"

    def __init__(self, device: str | None = None, gid_index: int = 0, port_num: int = 1,
                 max_session_connections: int = 8, windows: str = "auto"):
        """``windows``: "auto" (type-2 memory windows where the device has them), "on"
        (required: TransportUnavailable without them) or "off" (per-PD MR rkeys)."""
        if windows not in ("auto", "on", "off"):
            raise errors.ConfigError(f"verbs windows must be auto, on or off, got {windows!r}")
        self.device = _Device(device, gid_index, port_num)
        self.max_session_connections = max_session_connections  # QPs per requester session
        why = "turned off" if windows == "off" else window_support(self.device)
        if why is not None and windows == "on":
            self.device.close()
            raise errors.TransportUnavailable(f"memory windows required but unavailable: {why}")
        self.windows = why is None
        self.window_reason = why
        self._lock = threading.Lock()
        self._sessions: dict[str, VerbsSession] = {}
        self._closed = False
        log.info("verbs provider on %s port %d, GID index %d", self.device.name, port_num, gid_index)
        if self.windows:
            log.info("rkeys are type-2 memory windows: each works only on its requester's QP")
        else:
            log.warning("rkeys are MR keys, valid on any QP of the requester's PD (%s)", why)

    def open_session(self, session_id: str, secret: bytes | None = None) -> ProviderSession:  # QPs are not dialled
        return self._add_session(session_id, lambda: VerbsSession(self, session_id))

    def stats(self) -> dict:
        with self._lock:
            sessions = list(self._sessions.values())
        return {"device": self.device.name, "sessions": len(sessions),
                "connections": sum(len(s.qps) for s in sessions),
                "regions": sum(len(s.regions) for s in sessions),
                "rkeys": "window" if self.windows else "region",
                "registered_bytes": sum(s.registered_bytes() for s in sessions)}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions.values())
        for session in sessions:
            session.close()
        self.device.close()


# -- requester ---------------------------------------------------------------------------------


class VerbsEndpoint(Endpoint):
    name = "verbs"

    def __init__(self, device: _Device, max_batch: int, max_outstanding: int):
        self.device = device
        self.max_batch = max_batch
        self.max_outstanding = max_outstanding
        #: ``local_params -> provider reply``: the control exchange ``recover()`` re-runs
        self.reconnect_params: Callable[[dict], dict] | None = None
        self.pd = _verbs.PD(device.ctx)
        try:
            self.cq, self.qp = self._new_qp()
        except BaseException:
            self.pd.close()
            raise
        self.psn = _new_psn()
        self._replaces: int | None = None  # the QP number recover() retired, until connected
        self._local: dict[int, object] = {}  # lkey -> MR
        self._closed = False

    def _new_qp(self):
        cq = _verbs.CQ(self.device.ctx, self.max_batch * self.max_outstanding + 16)
        try:
            qp = _verbs.QP(self.pd, cq, self.max_batch, self.max_outstanding)
        except BaseException:
            cq.close()
            raise
        for mr in getattr(self, "_local", {}).values():
            qp.allow_local(mr.lkey, mr.addr, mr.length)
        return cq, qp

    def _check_open(self) -> None:
        if self._closed:
            raise errors.TransportError("endpoint is closed")

    def local_params(self) -> dict:
        self._check_open()
        params = self.device.params(self.qp.qp_num, self.psn)
        if self._replaces is not None:
            params["replaces"] = self._replaces
        return params

    def connect(self, remote_params: dict) -> None:
        self._check_open()
        self.device.connect(self.qp, self.psn, remote_params, 0)
        self._replaces = None

    def register_local(self, addr: int, length: int) -> int:
        self._check_open()
        if addr <= 0 or length <= 0:
            raise errors.TransportError(f"cannot register local buffer ({addr:#x}, {length}): empty or null")
        mr = _verbs.MR(self.pd, addr, length, _verbs.ACCESS_LOCAL_WRITE)  # READs write into it
        self._local[mr.lkey] = mr
        self.qp.allow_local(mr.lkey, addr, length)
        return mr.lkey

    def deregister_local(self, lkey: int) -> None:
        mr = self._local.pop(lkey, None)
        if mr is None:
            raise errors.NotFound(f"lkey {lkey:#x} is not registered on this endpoint")
        self.qp.forbid_local(lkey)
        mr.close()

    def post(self, ops: np.ndarray, batch_id: int) -> None:
        self._check_open()
        if ops.dtype != OP_DTYPE or ops.ndim != 1:
            raise ValueError("ops must be a 1-D OP_DTYPE array")
        self.qp.post(np.ascontiguousarray(ops), batch_id)

    def poll(self, out: np.ndarray, timeout: float | None = None) -> int:
        if self._closed:
            raise errors.ConnectionLost("verbs endpoint is closed")
        if out.dtype != COMPLETION_DTYPE:
            raise ValueError("out must be a COMPLETION_DTYPE array")
        if timeout is None and self.qp.outstanding == 0:
            raise errors.TransportError("poll() without a timeout and nothing outstanding would wait forever")
        return self.qp.poll(out, timeout)

    @property
    def outstanding(self) -> int:
        return 0 if self._closed else self.qp.outstanding

    def c_core(self):
        """The QP: the page store's C request path posts and polls it without the GIL (through
        ``QP.c_interface()``), and abandons what it gives up on (QP to error, flush drained)."""
        return None if self._closed or self.qp.broken else self.qp

    def c_failure(self, code: int, detail: int) -> str:
        qpn = self.qp.qp_num
        if code == _verbs.C_POST_FAILED:
            return f"ibv_post_send on QP {qpn} failed in C: {os.strerror(detail)} (errno {detail})"
        if code == _verbs.C_POLL_FAILED:
            return f"polling QP {qpn}'s completions failed in C: {os.strerror(detail)} (errno {detail})"
        if code == _verbs.C_BAD_BATCH:
            return f"C posted a batch of {detail} ops on QP {qpn} (1..{self.max_batch}, READ or WRITE)"
        return super().c_failure(code, detail)

    def recover(self) -> None:
        """Replace the QP (dropping batches in flight) and reconnect through ``reconnect_params``."""
        self._check_open()
        cq, qp = self._new_qp()
        old_qpn = self.qp.qp_num
        self.qp.close()
        self.cq.close()
        self.cq, self.qp = cq, qp
        self.psn = _new_psn()
        if self._replaces is None:
            self._replaces = old_qpn
        if self.reconnect_params is None:
            raise errors.ConnectionLost(
                f"verbs QP {old_qpn} was replaced by {qp.qp_num}; the provider must accept it: "
                "ep.connect(<control>.connect(ep.local_params())), or set ep.reconnect_params")
        try:
            reply = self.reconnect_params(self.local_params())
        except errors.RramError as exc:
            raise errors.ConnectionLost(f"verbs QP {self.qp.qp_num}: the provider did not accept it again: {exc}") from exc
        self.connect(reply)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._local.clear()
        self.pd.close()  # QP and MRs first
        self.cq.close()


class RequesterTransportImpl(RequesterTransport):
    name = "verbs"

    def __init__(self, device: str | None = None, gid_index: int = 0, port_num: int = 1,
                 max_batch: int = 1024, max_outstanding: int = 16):
        self.device = _Device(device, gid_index, port_num)
        limits = self.device.limits
        # every work request of every outstanding batch needs a send-queue slot and, when
        # flushed after an error, a CQ entry
        room = min(limits["max_qp_wr"], limits["max_cqe"] - 16)
        self.max_batch = max(1, min(max_batch, room))
        self.max_outstanding = max(1, min(max_outstanding, room // self.max_batch))

    def endpoint(self) -> Endpoint:
        return VerbsEndpoint(self.device, self.max_batch, self.max_outstanding)

    def close(self) -> None:
        self.device.close()  # closes every endpoint's QP, MRs, PD and CQ first
