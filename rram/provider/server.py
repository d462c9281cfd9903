"""The provider daemon: leases slabs of its idle RAM to requesters.

    rram provider --config cluster.yaml --name NODE [--transport tcp]

One control listener on the node's (address, port), a thread per control connection
(connection.py), one data transport (tcp, verbs or loopback) with a session per requester.
Each requester session owns its leases; when its control connection drops without ``bye``
the leases stay registered for ``lease_grace`` seconds so the requester can ``resume``, and
are deregistered and unmapped after that.  Capacity is never exceeded.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from .. import config as C
from .. import errors, transport
from .. import tls as T
from ..control import messages as M
from ..transport.admission import Admission, Busy, Caps
from .connection import ControlConnection, Refused
from .slabs import Slab, SlabPool

log = logging.getLogger(__name__)

IO_TIMEOUT = 10.0  # seconds a peer may take for the handshake or to finish a started frame
COUNTERS = ("connections", "auth_failures", "protocol_errors", "requests", "allocs", "frees",
            "alloc_bytes", "freed_bytes", "sessions_opened", "sessions_resumed", "sessions_expired")


@dataclass
class RequesterSession:
    id: str
    requester: str
    role: str
    generation: int
    token: str
    transport_session: object
    conn: ControlConnection | None = None
    slabs: dict[int, Slab] = field(default_factory=dict)
    detached_at: float | None = None
    released: bool = False
    degraded: int = 0  # the requester's slabs with fewer copies than it wants (its last report)

    @property
    def used(self) -> int:
        return sum(s.length for s in self.slabs.values())


class Provider:
    """The state of one provider node; ``start()`` opens the listeners, ``close()`` ends it all."""

    def __init__(self, cfg: C.ClusterConfig, name: str, transport_name: str | None = None,
                 io_timeout: float = IO_TIMEOUT):
        self.cfg = cfg
        self.node = cfg.node(name)
        if not self.node.is_provider:
            raise errors.ConfigError(f"{cfg.source}: node {name!r} does not have the provider role")
        self.master = cfg.secret_bytes()  # every identity key derives from it (control/auth.py)
        self.tls = T.provider_context(cfg, name)  # None: plaintext control connections
        self.requested_transport = transport_name or cfg.transport
        self.io_timeout = io_timeout
        lim = cfg.limits
        self.admission = Admission(Caps(lim.max_connections, lim.max_connections_per_peer, lim.max_handshakes))
        # a restart marker (start time, ms): a requester that sees it change knows our memory was lost
        self.incarnation = time.time_ns() // 1_000_000
        self.state = "serving"
        self.pool = SlabPool(self.node.capacity, mlock=self.node.mlock, hugepages=self.node.hugepages)
        self.transport_name = ""
        self.transport_reason = ""
        self.pt = None
        self.address: tuple[str, int] | None = None
        self._sessions: dict[str, RequesterSession] = {}
        self._conns: set[ControlConnection] = set()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.stopping = threading.Event()  # set by a shutdown request: main() exits
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._started = time.monotonic()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        tname, why = transport.choose(self.requested_transport)
        log.info("transport %s (%s)", tname, why)
        options = self.cfg.transport_options(tname, self.node)
        if tname == "tcp":  # its data listener shares the connection caps and deadlines
            options.update(admission=self.admission, io_timeout=self.io_timeout)
        self.pt = transport.provider_transport(tname, **options)
        self.transport_name, self.transport_reason = tname, why
        try:
            self._listener = socket.create_server((self.node.address, self.node.port))
        except OSError as exc:
            self.pt.close()
            raise errors.os_error(f"cannot listen on {self.node.address}:{self.node.port}", exc.errno or 0) from exc
        self.address = self._listener.getsockname()[:2]
        for target, tname_ in ((self._accept_loop, "accept"), (self._reap_loop, "reaper")):
            t = threading.Thread(target=target, name=f"rram-provider-{tname_}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("provider %s serving %d bytes on %s:%d (control: %s)", self.node.name, self.pool.capacity,
                 *self.address, "TLS 1.3" if self.tls else "plaintext")
        if self.tls is None:
            log.warning("control connections are not encrypted: the cluster file has no tls_dir "
                        "(README: Security model)")

    def close(self) -> None:
        """Orderly shutdown: tell every peer, release every lease, close the transport."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
            sessions = list(self._sessions.values())
        for conn in conns:
            conn.shut("shutdown", f"provider {self.node.name} is shutting down")
        for s in sessions:
            self.release(s, "shutdown")
        if self.pt is not None:
            self.pt.close()
        for t in self._threads:
            t.join(timeout=2)
        log.info("provider %s stopped", self.node.name)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                log.warning("control accept failed", exc_info=True)
                time.sleep(0.1)
                continue
            try:
                ticket = self.admission.admit(peer[0], "control")
            except Busy as exc:
                _refuse(sock, exc)
                continue
            _keepalive(sock)
            # replies are small and the TLS handshake is several flights: Nagle would hold
            # each behind the peer's delayed ACK (40 ms a round on Linux)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = ControlConnection(self, sock, peer, self.io_timeout, ticket)
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    ticket.close()
                    return
                self._conns.add(conn)
                self._counters["connections"] += 1
            threading.Thread(target=conn.serve, name=f"rram-control-{peer[1]}", daemon=True).start()

    def _reap_loop(self) -> None:
        grace = self.cfg.lease_grace
        while not self._stop.wait(min(0.5, grace / 4)):
            now = time.monotonic()
            with self._lock:
                expired = [s for s in self._sessions.values()
                           if s.conn is None and s.detached_at is not None and now - s.detached_at >= grace]
            for s in expired:
                n = self.release(s, f"no resume within lease_grace={grace:g}s")
                self.count("sessions_expired")
                if n:
                    log.warning("requester %r (session %s) gone for %.1fs: reclaimed %d leases",
                                s.requester, s.id, now - s.detached_at, n)

    # -- sessions -------------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def forget(self, conn: ControlConnection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def new_session(self, requester: str, role: str, generation: int, conn: ControlConnection,
                    secret: bytes) -> RequesterSession:
        if self._stop.is_set():
            raise Refused("shutdown", f"provider {self.node.name} is shutting down")
        cap = self.cfg.limits.max_sessions_per_requester
        with self._lock:  # detached sessions count too: they hold leases until the grace ends
            if sum(1 for s in self._sessions.values() if s.requester == requester) >= cap:
                raise Refused("limit", f"requester {requester!r} already has {cap} sessions here "
                                       f"(limits.max_sessions_per_requester)")
        sid = secrets.token_hex(8)
        ts = self.pt.open_session(f"{requester}/{sid}", secret)
        s = RequesterSession(sid, requester, role, generation, secrets.token_hex(16), ts, conn)
        with self._lock:
            self._sessions[sid] = s
            self._counters["sessions_opened"] += 1
        return s

    def detach(self, s: RequesterSession, conn: ControlConnection) -> None:
        """The control connection of ``s`` ended without bye: start the grace period."""
        with self._lock:
            if s.conn is not conn or s.released:
                return
            s.conn = None
            s.detached_at = time.monotonic()
        if s.slabs:
            log.info("requester %r (session %s) disconnected holding %d leases; keeping them %gs",
                     s.requester, s.id, len(s.slabs), self.cfg.lease_grace)

    def resume(self, fresh: RequesterSession, sid: str, token: str, conn: ControlConnection) -> RequesterSession:
        """Move ``conn`` from its fresh session back to the old session ``sid``."""
        from ..control import auth

        with self._lock:
            old = self._sessions.get(sid)
            if old is None or old.released or not auth.verify(old.token, token):
                raise errors.NotFound(f"no session {sid!r} to resume here (expired after "
                                      f"lease_grace={self.cfg.lease_grace:g}s, or provider restarted)")
            if (old.requester, old.role) != (fresh.requester, fresh.role):
                raise Refused("auth", f"session {sid} belongs to {old.role} {old.requester!r}")
            if fresh.slabs:
                raise Refused("state", "resume must come before any lease on a new connection")
            previous = old.conn
            old.conn, old.detached_at = conn, None
            self._counters["sessions_resumed"] += 1
        if previous is not None and previous is not conn:
            previous.shut("state", "session resumed on another connection")
        self.release(fresh, "replaced by a resumed session")
        log.info("requester %r resumed session %s with %d leases", old.requester, sid, len(old.slabs))
        return old

    def release(self, s: RequesterSession, why: str) -> int:
        """Deregister and unmap every lease of ``s`` and close its transport session."""
        with self._lock:
            if s.released:
                return 0
            s.released = True
            slabs = list(s.slabs.values())
            s.slabs.clear()
            self._sessions.pop(s.id, None)
        try:
            s.transport_session.close()  # deregisters every region: no access after this
        except errors.RramError as exc:
            log.warning("closing transport session %s: %s", s.id, exc)
        for slab in slabs:
            self.pool.release(slab)
        log.debug("session %s of %r released (%s): %d leases", s.id, s.requester, why, len(slabs))
        return len(slabs)

    # -- requests -------------------------------------------------------------------------------

    def alloc(self, s: RequesterSession, size: int) -> Slab:
        if self.state != "serving":
            raise Refused("draining", f"provider {self.node.name} is {self.state}: no new leases")
        with self._lock:
            self._check_quota(s, size)  # fail before taking memory from the pool
        slab = self.pool.allocate(size)
        try:
            with self._lock:
                if s.released:
                    raise Refused("state", f"session {s.id} is closed")
                # again, under the lock that adds the slab: of racing allocs (the requester's
                # other sessions, connections) each sees the others' slabs, so none overshoots
                self._check_quota(s, slab.length)
                slab.rkey = s.transport_session.register(slab.arena.addr, slab.length)
                s.slabs[slab.lease_id] = slab
                self._counters["allocs"] += 1
                self._counters["alloc_bytes"] += slab.length
        except BaseException:
            self.pool.release(slab)
            raise
        return slab

    def _check_quota(self, s: RequesterSession, size: int) -> None:
        """Refuse ``size`` more bytes to ``s``'s requester beyond its quota here (under _lock)."""
        quota = self.cfg.quota(s.requester)
        if quota is None:
            return
        held = sum(x.used for x in self._sessions.values() if x.requester == s.requester)
        if held + size > quota:
            raise errors.CapacityError(f"requester {s.requester!r} would hold {held + size} bytes here, "
                                       f"over its quota of {quota}")

    def free(self, s: RequesterSession, lease_id: int) -> int:
        with self._lock:
            slab = s.slabs.pop(lease_id, None)
            if slab is None:
                raise errors.NotFound(f"lease {lease_id} is not held by this session")
            s.transport_session.deregister(slab.rkey)
            self._counters["frees"] += 1
            self._counters["freed_bytes"] += slab.length
        self.pool.release(slab)
        return slab.length

    def accept(self, s: RequesterSession, params: dict) -> dict:
        try:
            return s.transport_session.accept(params)
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ProtocolError(f"bad {self.transport_name} connect parameters: {exc}") from exc

    def drain(self) -> str:
        self.state = "draining"
        log.warning("provider %s draining: no new leases", self.node.name)
        return self.state

    def undrain(self) -> str:
        if self.state == "draining":
            self.state = "serving"
            log.warning("provider %s undrained: leasing again", self.node.name)
        return self.state

    def reload(self) -> int:
        """Re-read the cluster file: quotas and revocations apply at once; sessions of revoked
        keys are cut (their leases freed).  Nodes, ports and limits need a restart."""
        cfg = C.load(self.cfg.source)
        self.cfg.quotas, self.cfg.default_quota, self.cfg.revoked = cfg.quotas, cfg.default_quota, cfg.revoked
        with self._lock:
            cut = [s for s in self._sessions.values() if cfg.is_revoked(s.requester, s.generation)]
        for s in cut:
            if s.conn is not None:
                s.conn.shut("auth", f"the key of {s.role} {s.requester!r} (generation {s.generation}) was revoked")
            self.release(s, "key revoked")
            log.warning("cut session %s of %s %r: its key was revoked", s.id, s.role, s.requester)
        return len(cut)

    def request_shutdown(self) -> str:
        """Exit once drained (``rram drain`` asks for this); refused while leases remain."""
        if self.pool.count:
            raise errors.RramError(f"{self.pool.count} leases still held: drain first")
        self.state = "stopping"
        self.stopping.set()
        return self.state

    def reclaim(self, nbytes: int) -> dict:
        """Give ``nbytes`` of memory back to the host (memory pressure).  Slabs are mapped only
        while leased, so that means ``nbytes`` fewer leased bytes: the capacity drops to what is
        leased now minus ``nbytes`` (no new leases past it), and every requester is asked, in its
        heartbeats, for its share of the excess (ephemeral pages first, then slabs moved away)."""
        if nbytes < 0:
            raise Refused("bad_request", f"reclaim needs a byte count >= 0, got {nbytes}")
        with self._lock:
            self.pool.capacity = max(0, min(self.pool.capacity, self.pool.used) - nbytes)
            excess = max(0, self.pool.used - self.pool.capacity)
        log.warning("provider %s gives back %d bytes: capacity now %d, %d leased beyond it",
                    self.node.name, nbytes, self.pool.capacity, excess)
        return {"capacity": self.pool.capacity, "excess": excess}

    def report(self, session: RequesterSession | None, degraded: int) -> dict:
        """A requester's state for ``rram status``: how many of its slabs are degraded."""
        if session is None or degraded < 0:
            raise Refused("bad_request", f"report needs a session and a count >= 0, got {degraded}")
        session.degraded = degraded
        return {}

    def heartbeat(self, session: RequesterSession | None = None) -> dict:
        """Our state; ``reclaim``: the bytes ``session`` should give back (its share of what is
        leased beyond the capacity after a reclaim), rounded up to whole bytes."""
        with self._lock:
            used, excess = self.pool.used, max(0, self.pool.used - self.pool.capacity)
            mine = session.used if session is not None else 0
        share = -(-excess * mine // used) if excess and used else 0
        return {"incarnation": self.incarnation, "capacity": self.pool.capacity, "free": max(0, self.pool.free),
                "load": round(os.getloadavg()[0], 2), "state": self.state, "reclaim": share}

    def stats(self, requester: str | None = None) -> dict:
        """Everything, or (``requester``) only that requester's own sessions."""
        now = time.monotonic()
        with self._lock:
            per_session = [{"session": s.id, "requester": s.requester, "role": s.role, "leases": len(s.slabs),
                            "bytes": s.used, "connected": s.conn is not None, "degraded": s.degraded,
                            "detached_for": None if s.detached_at is None else round(now - s.detached_at, 3)}
                           for s in self._sessions.values() if requester in (None, s.requester)]
            counters = dict(self._counters)
            conns = len(self._conns)
        tstats = self.pt.stats() if hasattr(self.pt, "stats") else {}
        out = {"node": self.node.name, "incarnation": self.incarnation, "state": self.state,
               "transport": self.transport_name, "transport_reason": self.transport_reason,
               "uptime": round(now - self._started, 3), "capacity": self.pool.capacity,
               "used": self.pool.used, "free": self.pool.free, "leases": self.pool.count,
               "sessions": len(per_session), "control_connections": conns, "per_session": per_session,
               "counters": counters, "transport_stats": tstats, "admission": self.admission.stats()}
        for key in ("ops", "batches", "bytes_read", "bytes_written"):
            out[key] = tstats.get(key, 0)
        return out


def _refuse(sock: socket.socket, exc: Exception) -> None:
    """Say why (if the socket takes it at once) and close, without a thread or a wait."""
    try:
        sock.send(M.encode(M.error_reply(0, "limit", str(exc))), socket.MSG_DONTWAIT)
    except OSError:
        pass
    sock.close()


def _bound_malloc() -> None:
    """Serve every buffer above 128 KiB from its own mapping, so one freed after a big batch goes
    back to the kernel at once: the provider's RSS follows its I/O budget (glibc otherwise
    raises this threshold as buffers are freed and keeps them in per-thread arenas)."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        log.info("mallopt unavailable: freed I/O buffers may stay in the heap")


def _keepalive(sock: socket.socket) -> None:
    """Notice a vanished requester host within about half a minute."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def main(args) -> int:
    """``rram provider``: run until SIGTERM/SIGINT."""
    _bound_malloc()
    threading.stack_size(256 << 10)  # a thread per connection: keep their stacks small
    try:
        cfg = C.load(args.config)
        provider = Provider(cfg, args.name, args.transport, io_timeout=args.io_timeout)
        provider.start()
    except errors.RramError as exc:
        log.error("provider %s cannot start: %s", args.name, exc)
        return 1
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = None
    if provider.node.metrics_port is not None:
        from ..metrics import serve_metrics

        metrics = serve_metrics(provider.node.metrics_port, "rram_provider", provider.stats,
                                host=provider.node.metrics_address, labels={"node": provider.node.name})
    host, port = provider.address
    print(f"rram provider {provider.node.name} ready control={host}:{port} transport={provider.transport_name}",
          flush=True)
    try:
        while not stop.wait(0.2) and not provider.stopping.is_set():
            pass
    finally:
        provider.close()
        if metrics is not None:
            metrics.close()
    sys.stdout.flush()
    return 0
