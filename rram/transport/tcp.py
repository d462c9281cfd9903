"""One-sided READ/WRITE emulated over TCP.

Provider: one data listener; ``session.accept({})`` mints a random token bound to the session
and returns ``{"host", "port", "token"}``.  The requester dials, gets a CHALLENGE, answers
with the token and a MAC of the challenge keyed with the session's secret (HELLO), and checks
the provider's MAC in HELLO_OK (wire.py); the connection then belongs to that session and can
only reach its regions.  A sniffed token is useless without the secret, and a replayed HELLO
fails the fresh challenge.  A token stays valid while its session lives, so ``recover()``
re-dials with it; a new proven dial with a token replaces that token's previous connection.  One thread per data
connection: Python reads the HELLO, then one C call (``_tcpwire.WireServer.serve``, GIL
released) receives, checks, executes and answers every REQUEST until the peer leaves or
breaks the protocol; Python then words the error from wire.py and sends the ERROR frame.

Requester: ``post`` is one C call that checks lkeys, encodes the frame and sends it; ``poll``
is one C call that reads completions in the calling thread (no reader thread: a cross-thread
wake-up costs more than the round trip), checks each one's sequence number and MAC, scatters
READ data and fills the completion array.  A completion that fails its MAC is a lost
connection (ConnectionLost, as for a reset): the store suspends the link and fails over.
Batches pipeline: the provider answers them in order.  Frames are described in wire.py, whose
pure-Python decoder remains the reference (fuzzed) and handles the HELLO exchange.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import threading
import time

import numpy as np

from .. import errors
from . import wire
from .admission import Admission, Busy, Ticket
from .base import (
    COMPLETION_DTYPE,
    OP_DTYPE,
    Endpoint,
    ProviderSession,
    ProviderTransport,
    RegionTableEndpoint,
    RegionTableSession,
    RequesterTransport,
)
from .emulated import ProviderStats, unavailable_reason

try:
    from .._ext import _regions, _tcpwire
except ImportError:  # pragma: no cover - unavailable_reason() says why
    _regions = _tcpwire = None

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
#: data-connection buffers of a provider, all connections together (see IoBudget)
DEFAULT_IO_BUDGET = 256 << 20
CONNECT_TIMEOUT = 10.0
SHUT_TIMEOUT = 1.0
#: how long the requester's ``poll`` may spin on a non-blocking recv before sleeping in poll():
#: it must outlast a round trip that wakes the provider's CPU, or it never catches one and the
#: adaptive policy turns it off.  4 KiB READ p50 on 2 vCPUs, split CPUs, one machine: 85 -> 25
#: us with 20; on another (Xeon, 2026-12) the round trip took ~25-40 us, 20 caught none (94 us)
#: and 50 caught nearly all (24 us; store.get 88 -> 43 us).  50 is also what the kernel's own
#: busy polling suggests (net.core.busy_read).  It spins only while spinning catches completions
#: (ext/spin.pxd): with the provider on the requester's own CPU, a spin is never answered and it
#: stops
DEFAULT_SPIN_US = 50
#: the provider's wait for the next request, under the same adaptive policy: a fixed 20 us spin
#: once brought the split case to 9 us but cost the donor a busy CPU and made a same-CPU pair
#: 3-6x slower; adaptive, it polls only while requests come back within the cap (a requester
#: on the provider's own CPU cannot send while it polls: those polls miss and it stops).
#: Measured (2 vCPUs, split): store.get p50 45 -> 11 us, far-memory random remote faults
#: 21 k -> 50 k/s
DEFAULT_PROVIDER_SPIN_US = 50


def _recv_exact(sock: socket.socket, n: int, before: int = 0, deadline: float | None = None) -> bytearray | None:
    """n bytes from ``sock``; None if it closed before the first byte of a frame.  With a
    ``deadline`` (time.monotonic()), the whole read must end by then: a peer cannot keep a
    connection in its handshake by dripping bytes."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.ProtocolError(f"handshake not finished in time ({before + got} bytes received)")
            sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:])
        except socket.timeout:
            raise errors.ProtocolError(f"handshake not finished in time ({before + got} bytes received)") from None
        if k == 0:
            if got or before:
                raise errors.ProtocolError(f"connection closed inside a frame ({before + got} bytes buffered)")
            return None
        got += k
    return buf


def _read_frame(sock: socket.socket, accept: frozenset, deadline: float | None = None):
    """One whole frame as a wire event (HELLO exchange only), or None at a clean EOF."""
    raw = _recv_exact(sock, wire.HEADER.size, 0, deadline)
    if raw is None:
        return None
    h = wire.parse_header(raw, 0, accept)
    body = _recv_exact(sock, h.body_len, wire.HEADER.size, deadline) if h.body_len else bytearray()
    return wire.parse_body(h, memoryview(body))


# -- provider ---------------------------------------------------------------------------------


class _DataConnection:
    """One accepted data socket, served by its own thread."""

    def __init__(self, provider: ProviderTransportImpl, sock: socket.socket, peer, ticket: Ticket):
        self.provider = provider
        self.sock = sock
        self.peer = peer
        self.ticket = ticket
        self.session: _TcpSession | None = None
        self.token: bytes | None = None
        self.core = _tcpwire.WireServer(sock.fileno(), provider.budget)  # BufferError: budget taken
        self.core.spin_ns = int(provider.spin_us * 1000)
        self.core.frame_timeout_ns = self.core.send_timeout_ns = int(provider.io_timeout * 1e9)

    def shut(self, code: int, message: str) -> None:
        """Tell the peer why, then close (callable from any thread, idempotent)."""
        self.core.shut(wire.error(code, message), SHUT_TIMEOUT)

    def serve(self) -> None:
        try:
            self._serve()
        except errors.ProtocolError as exc:
            log.info("data connection from %s: %s", self.peer, exc)
            self.provider._stats.error()
            self.shut(wire.E_BAD_FRAME, str(exc))
        except Busy as exc:
            log.warning("data connection from %s: %s; dropping it", self.peer, exc)
            self.provider._stats.error()
            self.shut(wire.E_BUSY, str(exc))
        except OSError as exc:
            log.debug("data connection from %s dropped: %s", self.peer, exc)
        except Exception:  # keep the provider serving whatever one connection does
            log.exception("data connection from %s failed", self.peer)
            self.shut(wire.E_BAD_FRAME, "internal error")
        finally:
            if self.session is not None:
                self.session._detach(self)
            self.provider._forget(self)
            self.core.mark_closed()
            self.core.release()
            self.sock.close()
            self.ticket.close()

    def _serve(self) -> None:
        deadline = time.monotonic() + self.provider.io_timeout  # for the whole handshake
        nonce = secrets.token_bytes(wire.NONCE_SIZE)
        if not self.core.send_frame(wire.challenge(nonce)):
            return
        ev = _read_frame(self.sock, wire.TO_PROVIDER, deadline)
        if ev is None:
            return
        if not isinstance(ev, wire.Hello):
            raise errors.ProtocolError(f"expected HELLO first, got {type(ev).__name__.upper()}")
        session = self.provider._session_for(ev.token)
        if session is None or not hmac.compare_digest(ev.mac, wire.hello_mac(session.secret, nonce, ev.token)):
            self.provider._stats.error()
            log.warning("data connection from %s: %s", self.peer, "unknown token" if session is None else
                        f"HELLO for session {session.session_id} not proven with its secret (sniffed token?)")
            self.shut(wire.E_BAD_TOKEN, "unknown or expired session token, or a HELLO not proven with its secret")
            return
        self.session, self.token = session, ev.token
        self.ticket.authenticated()
        session._attach(self)
        self.sock.settimeout(None)
        self.core.set_frame_key(wire.frame_key(session.secret, nonce, ev.token))
        if self.core.send_frame(wire.hello_ok(wire.hello_ok_mac(session.secret, nonce, ev.token))):
            self._check(self.core.serve(session.table))

    def _check(self, code: int) -> None:
        """Turn how ``WireServer.serve`` ended into an exception (or nothing for a clean end)."""
        a, b, _c = self.core.detail()
        if code == _tcpwire.R_SHUT or (code == _tcpwire.R_EOF and a == 0):
            return
        if code == _tcpwire.R_EOF:
            raise errors.ProtocolError(f"connection closed inside a frame ({a} bytes buffered)")
        if code == _tcpwire.R_OS_ERROR:
            raise OSError(a, os.strerror(a))
        if code == _tcpwire.R_BAD_HEADER:
            h = wire.parse_header(self.core.header(), 0, wire.TO_PROVIDER)  # raises with the reason
            if h.type == wire.REQUEST:  # valid for the reference; the C loop refused its MAC flag
                raise errors.ProtocolError(f"REQUEST with flags {h.flags:#x}, which this connection does not expect")
            raise errors.ProtocolError("HELLO sent twice on one connection" if h.type == wire.HELLO
                                       else f"unexpected {wire.TYPE_NAMES[h.type]} frame")
        if code == _tcpwire.R_BAD_PAYLOAD:
            raise errors.ProtocolError(
                f"request payload of {a} bytes does not match the WRITE lengths of its operations")
        if code == _tcpwire.R_READ_LIMIT:
            raise errors.ProtocolError(f"batch reads {a} bytes; the limit is {wire.MAX_PAYLOAD}")
        if code == _tcpwire.R_NOMEM:
            raise MemoryError("cannot grow a data connection buffer")
        if code == _tcpwire.R_BUDGET:
            budget = self.provider.budget
            raise Busy(f"a frame needing a {a}-byte buffer does not fit the provider's I/O budget "
                       f"({budget.available} of {budget.total} bytes free)")
        if code == _tcpwire.R_BAD_MAC:
            raise errors.ProtocolError(f"request {a} on this connection: missing or bad MAC, or sequence number {b} "
                                       "(altered, replayed, reordered or not signed with the connection's key)")
        if code == _tcpwire.R_TIMEOUT:
            raise errors.ProtocolError(f"frame not finished within {self.provider.io_timeout:g}s "
                                       f"({a} bytes received)")
        raise RuntimeError(f"unexpected result {code} from the data connection loop")


class _TcpSession(RegionTableSession):
    def __init__(self, provider: ProviderTransportImpl, session_id: str, secret: bytes | None):
        self.provider = provider
        self.session_id = session_id
        self._share_secret = secret is None  # made up here: accept() hands it over (in-process use)
        self.secret = secret if secret is not None else secrets.token_bytes(32)
        self.table = _regions.RegionTable()
        self.tokens: set[bytes] = set()
        self.connections: dict[bytes, _DataConnection] = {}
        self.closed = False
        self._lock = threading.Lock()

    def accept(self, peer_params: dict) -> dict:
        if self.closed:
            raise errors.TransportError(f"session {self.session_id} is closed")
        token = secrets.token_bytes(wire.TOKEN_SIZE)
        cap = self.provider.max_session_connections
        with self._lock:
            if len(self.tokens) >= cap:  # each token is a connection that may fill a buffer
                raise errors.CapacityError(f"session {self.session_id} already has {cap} data connections "
                                           f"(limits.max_data_connections)")
            self.tokens.add(token)
        self.provider._add_token(token, self)
        host, port = self.provider.address
        params = {"host": host, "port": port, "token": token.hex()}
        if self._share_secret:
            params["session_secret"] = self.secret.hex()
        return params

    def _attach(self, conn: _DataConnection) -> None:
        with self._lock:
            old = self.connections.get(conn.token)
            self.connections[conn.token] = conn
            closed = self.closed
        if old is not None:
            old.shut(wire.E_SESSION_CLOSED, "replaced by a new connection with the same token")
        if closed:
            conn.shut(wire.E_SESSION_CLOSED, f"session {self.session_id} is closed")

    def _detach(self, conn: _DataConnection) -> None:
        with self._lock:
            if self.connections.get(conn.token) is conn:
                del self.connections[conn.token]

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            conns = list(self.connections.values())
            tokens = set(self.tokens)
        self.provider._drop_session(self, tokens)
        self.table.clear()  # waits for batches in progress
        for conn in conns:
            conn.shut(wire.E_SESSION_CLOSED, f"session {self.session_id} is closed")


class ProviderTransportImpl(ProviderTransport):
    """The provider's data listener and its sessions."""

    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, spin_us: float = DEFAULT_PROVIDER_SPIN_US, *,
                 admission: Admission | None = None, io_budget: int = DEFAULT_IO_BUDGET,
                 io_timeout: float = HELLO_TIMEOUT, max_session_connections: int = 8):
        """``admission`` caps connections (the provider shares its own); ``io_budget`` bounds the
        buffers of every data connection together; ``io_timeout`` is the deadline for a whole
        HELLO, for a started frame and for a reply to leave; a session mints at most
        ``max_session_connections`` tokens (one connection each)."""
        reason = unavailable_reason()
        if reason:
            raise errors.TransportUnavailable(reason)
        self.spin_us = spin_us
        self.admission = admission or Admission()
        self.budget = _tcpwire.IoBudget(io_budget)
        self.io_timeout = io_timeout
        self.max_session_connections = max_session_connections
        try:
            self._listener = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise errors.os_error(f"cannot listen on {host}:{port}", exc.errno or 0) from exc
        self.address = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._sessions: dict[str, _TcpSession] = {}
        self._tokens: dict[bytes, _TcpSession] = {}
        self._conns: set[_DataConnection] = set()
        self._stats = ProviderStats()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"rram-tcp-listen-{self.address[1]}",
                                        daemon=True)
        self._thread.start()

    def open_session(self, session_id: str, secret: bytes | None = None) -> ProviderSession:
        return self._add_session(session_id, lambda: _TcpSession(self, session_id, secret))

    def stats(self) -> dict:
        with self._lock:
            out = self._stats.snapshot(conn.core.counters() for conn in self._conns)
            out["connections"] = len(self._conns)
            out["io_budget"], out["io_budget_free"] = self.budget.total, self.budget.available
            out["regions"] = sum(len(s.table) for s in self._sessions.values())
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions.values())
            conns = list(self._conns)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for session in sessions:
            session.close()
        for conn in conns:
            conn.shut(wire.E_SHUTDOWN, "provider shutting down")
        self._thread.join(timeout=5)

    # -- internals used by sessions and connections ---------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                log.warning("data listener accept failed", exc_info=True)
                time.sleep(0.1)
                continue
            try:
                ticket = self.admission.admit(peer[0], "data")
            except Busy as exc:
                _refuse(sock, wire.error(wire.E_BUSY, str(exc)))
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                conn = _DataConnection(self, sock, peer, ticket)
            except BufferError as exc:
                ticket.close()
                self.admission.refuse(peer[0], "data", str(exc))
                _refuse(sock, wire.error(wire.E_BUSY, f"provider busy: {exc}"))
                continue
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=conn.serve, name=f"rram-tcp-data-{peer[1]}", daemon=True).start()

    def _forget(self, conn: _DataConnection) -> None:
        with self._lock:  # fold its counters in and drop it in one step: stats never see it twice
            if conn in self._conns:
                self._conns.discard(conn)
                self._stats.add(conn.core.counters())

    def _add_token(self, token: bytes, session: _TcpSession) -> None:
        with self._lock:
            self._tokens[token] = session

    def _session_for(self, token: bytes) -> _TcpSession | None:
        with self._lock:
            return self._tokens.get(token)

    def _drop_session(self, session: _TcpSession, tokens: set[bytes]) -> None:
        with self._lock:
            for token in tokens:
                self._tokens.pop(token, None)
        self._drop(session)


def handshake(sock: socket.socket, token: bytes, secret: bytes, where: str = "provider") -> bytes:
    """The requester's side of the data handshake on a connected socket (CHALLENGE, HELLO,
    HELLO_OK); returns the connection's frame key.  Raises ConnectionLost if the provider
    refuses, AuthError if it cannot prove itself."""
    nonce = None
    ev = _read_frame(sock, wire.TO_REQUESTER)
    if isinstance(ev, wire.Challenge):
        nonce = ev.nonce
        sock.sendall(wire.hello(token, wire.hello_mac(secret, nonce, token)))
        ev = _read_frame(sock, wire.TO_REQUESTER)
    if ev is None:
        raise errors.ConnectionLost(f"provider {where} closed the connection during HELLO")
    if isinstance(ev, wire.Error):
        raise errors.ConnectionLost(f"provider {where} refused the connection ({ev.describe()})")
    if not isinstance(ev, wire.HelloOk) or nonce is None:
        raise errors.ProtocolError(f"expected CHALLENGE then HELLO_OK, got {type(ev).__name__}")
    if not hmac.compare_digest(ev.mac, wire.hello_ok_mac(secret, nonce, token)):
        raise errors.AuthError(f"data port {where} did not prove it holds the session's secret")
    return wire.frame_key(secret, nonce, token)


def _refuse(sock: socket.socket, frame: bytes) -> None:
    """Say why (if the socket takes it at once) and close: the accept loop never waits on a peer."""
    try:
        sock.send(frame, socket.MSG_DONTWAIT)
    except OSError:
        pass
    sock.close()


# -- requester --------------------------------------------------------------------------------


class TcpEndpoint(RegionTableEndpoint):
    name = "tcp"
    max_batch = wire.MAX_OPS
    max_outstanding = 16
    # a provider gathers a whole batch before it sends the completion frame: in frames of
    # ~64 KiB its copying and sending overlap our receiving, opening and copying, and its
    # frame buffer stays small.  The seal bench's get_many (256-page batches of one provider's
    # pages, ~0.5 MB a frame unchunked) took 1.2-1.6x as long unchunked, plain and sealed alike;
    # frames of 64 pages (~140 KB) were as slow as unchunked, 32-48 pages as fast as 64 KiB
    read_chunk = 64 << 10

    def __init__(self, spin_us: float = DEFAULT_SPIN_US):
        self._local = _regions.RegionTable()
        self._core = _tcpwire.WireRequester(self._local, self.max_outstanding, self.max_batch)
        self._core.spin_ns = int(spin_us * 1000)
        self._params: tuple[str, int, bytes, bytes] | None = None
        self._sock: socket.socket | None = None
        self._broken: str | None = "not connected"
        self._closed = False

    # -- connection ---------------------------------------------------------------------------

    def local_params(self) -> dict:
        return {}

    def connect(self, remote_params: dict) -> None:
        try:
            host, port = str(remote_params["host"]), int(remote_params["port"])
            token = bytes.fromhex(remote_params["token"])
            secret = bytes.fromhex(remote_params["session_secret"])
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ProtocolError(f"tcp connect parameters need host, port, a hex token and the "
                                       f"session_secret (the control client adds it): {exc}") from exc
        if len(token) != wire.TOKEN_SIZE:
            raise errors.ProtocolError(f"tcp token must be {wire.TOKEN_SIZE} bytes, got {len(token)}")
        if self._closed:
            raise errors.TransportError("endpoint is closed")
        self._params = (host, port, token, secret)
        self._dial()

    def recover(self) -> None:
        if self._params is None:
            raise errors.TransportError("recover() before connect()")
        if self._closed:
            raise errors.TransportError("endpoint is closed")
        self._dial()

    def _dial(self) -> None:
        self._disconnect("reconnecting")
        host, port, token, secret = self._params
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise errors.ConnectionLost(f"cannot reach provider data port {host}:{port}: {exc}", exc.errno) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = handshake(sock, token, secret, f"{host}:{port}")
        except OSError as exc:
            sock.close()
            raise errors.ConnectionLost(f"data connection to {host}:{port} failed: {exc}", exc.errno) from exc
        except errors.RramError:
            sock.close()
            raise
        sock.setblocking(False)
        self._core.attach(sock.fileno())
        self._core.set_frame_key(key)
        self._sock, self._broken = sock, None
        if self._closed:  # close() ran in another thread while we dialled (a prober's recover)
            self._disconnect("closed")
            raise errors.TransportError("endpoint is closed")

    def _disconnect(self, why: str) -> None:
        self._broken = why
        self._core.detach()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _lost(self, why: str, err: int | None = None) -> errors.ConnectionLost:
        self._disconnect(why)
        return errors.ConnectionLost(why, err)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._disconnect("closed")
        self._local.clear()

    # -- local regions ------------------------------------------------------------------------

    # -- data path ----------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return self._core.outstanding

    def post(self, ops: np.ndarray, batch_id: int) -> None:
        if self._broken is not None:
            raise errors.ConnectionLost(f"tcp endpoint unusable ({self._broken}); call recover()")
        if type(ops) is not np.ndarray or ops.dtype != OP_DTYPE or ops.ndim != 1:
            raise errors.TransportError("ops must be a 1-D numpy array of OP_DTYPE")
        try:
            rc = self._core.post(ops, batch_id)
        except (BufferError, ValueError):  # numpy refuses a non-contiguous buffer: nothing was sent
            rc = self._core.post(np.ascontiguousarray(ops), batch_id)
        except BaseException:  # a signal while blocked: a partial frame may be on the wire
            self._disconnect("interrupted while sending a request")
            raise
        if rc:
            raise self._post_error(rc)

    def c_core(self):
        return self._core if self._broken is None else None

    def c_failure(self, code: int, detail: int) -> str:
        return str(self._post_error(code))  # the core kept the detail; disconnects like a failed post

    def _post_error(self, rc: int) -> errors.TransportError:
        a, b, _c = self._core.detail()
        if rc == _tcpwire.R_TOO_MANY:
            return errors.TransportError(f"{self.max_outstanding} batches already outstanding; poll first")
        if rc == _tcpwire.R_BAD_COUNT:
            return errors.TransportError(f"a batch holds 1..{self.max_batch} operations, got {a}")
        if rc == _tcpwire.R_TOO_BIG:
            return errors.TransportError(
                f"batch moves {a} bytes out and {b} in; the tcp limit is {wire.MAX_PAYLOAD} each way")
        return self._failure(rc)

    def poll(self, out: np.ndarray, timeout: float | None = None) -> int:
        if self._broken is not None:
            raise errors.ConnectionLost(f"tcp endpoint unusable ({self._broken}); call recover()")
        if type(out) is not np.ndarray or out.dtype != COMPLETION_DTYPE or out.ndim != 1:
            raise errors.TransportError("out must be a 1-D numpy array of COMPLETION_DTYPE")
        if timeout is None:
            if not self._core.outstanding:
                raise errors.TransportError("poll() without a timeout and nothing outstanding would wait forever")
            timeout = -1.0
        n = self._core.poll(out, timeout)
        if n < 0:
            raise self._failure(n)
        return n

    def _failure(self, rc: int) -> errors.TransportError:
        """The connection is no longer usable: say why, from the C side's result code."""
        core = self._core
        a, b, c = core.detail()
        if rc == _tcpwire.R_OS_ERROR:
            return self._lost(f"data connection to the provider failed: {os.strerror(a)}", a)
        if rc == _tcpwire.R_EOF:
            return self._lost("provider closed the data connection")
        if rc == _tcpwire.R_BAD_HEADER:
            try:
                h = wire.parse_header(core.header(), 0, wire.TO_REQUESTER)
                why = f"unexpected {wire.TYPE_NAMES[h.type]} frame after the handshake"
            except errors.ProtocolError as exc:
                why = str(exc)
            return self._lost(f"bad frame from provider: {why}")
        if rc == _tcpwire.R_ERROR_FRAME:
            ev = wire.Error(a, bytes(core.payload()).decode("utf-8", "replace"))
            return self._lost(f"provider closed the data connection ({ev.describe()})")
        if rc == _tcpwire.R_UNEXPECTED:
            return self._lost("bad frame from provider: HELLO_OK after the handshake")
        if rc == _tcpwire.R_WRONG_BATCH:
            return self._lost(f"completion for batch {a} while expecting {b if c else None}")
        if rc == _tcpwire.R_BAD_INDEX:
            return self._lost(f"completion for batch {c} names op {a} of {b}")
        if rc == _tcpwire.R_BAD_PAYLOAD:
            return self._lost(f"completion for batch {c} carries {a} bytes, not its READ lengths")
        if rc == _tcpwire.R_OVERFLOW:
            return self._lost(f"provider sent {a} bytes, more than the outstanding batches can return")
        if rc == _tcpwire.R_SEQ_END:
            return self._lost(f"this data connection has used up its {a} request numbers; reconnecting gives "
                              "the next one a fresh key")
        if rc == _tcpwire.R_BAD_MAC:
            return self._lost(f"bad frame from provider: completion number {a} on this connection came with a "
                              f"missing or bad MAC, or numbered {b} (altered, replayed, reordered or forged on the way)")
        if rc == _tcpwire.R_NOMEM:
            return self._lost("out of memory for the data connection buffers")
        return self._lost(f"data path failed with code {rc}")


class RequesterTransportImpl(RequesterTransport):
    name = "tcp"

    def __init__(self, spin_us: float = DEFAULT_SPIN_US):
        reason = unavailable_reason()
        if reason:
            raise errors.TransportUnavailable(reason)
        self.spin_us = spin_us

    def endpoint(self) -> Endpoint:
        return TcpEndpoint(self.spin_us)
