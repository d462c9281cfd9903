"""One-sided READ/WRITE emulated over TCP.

Provider: one data listener; ``session.accept({})`` mints a random token bound to the session
and returns ``{"host", "port", "token"}``.  The requester dials, sends the token (HELLO) and
waits for HELLO_OK; the connection then belongs to that session and can only reach its
regions.  A token stays valid while its session lives, so ``recover()`` re-dials with it; a
new dial with a token replaces that token's previous connection.  One thread per data
connection: Python reads the HELLO, then one C call (``_tcpwire.WireServer.serve``, GIL
released) receives, checks, executes and answers every REQUEST until the peer leaves or
breaks the protocol; Python then words the error from wire.py and sends the ERROR frame.

Requester: ``post`` is one C call that checks lkeys, encodes the frame and sends it; ``poll``
is one C call that reads completions in the calling thread (no reader thread: a cross-thread
wake-up costs more than the round trip), scatters READ data and fills the completion array.
Batches pipeline: the provider answers them in order.  Frames are described in wire.py, whose
pure-Python decoder remains the reference (fuzzed) and handles the HELLO exchange.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

import numpy as np

from .. import errors
from . import wire
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
CONNECT_TIMEOUT = 10.0
SHUT_TIMEOUT = 1.0
#: how long the requester's ``poll`` spins on a non-blocking recv before sleeping in poll():
#: measured 4 KiB READ p50 on 2 vCPUs, split CPUs 85 -> 25 us, same CPU unchanged (9 us)
DEFAULT_SPIN_US = 20
#: the provider's connection loop does not spin by default: 20 us brings the split case to
#: 9 us but costs the donor a busy CPU and makes a same-CPU pair 3-6x slower
DEFAULT_PROVIDER_SPIN_US = 0


def _recv_exact(sock: socket.socket, n: int, before: int = 0) -> bytearray | None:
    """n bytes from ``sock``; None if it closed before the first byte of a frame."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got or before:
                raise errors.ProtocolError(f"connection closed inside a frame ({before + got} bytes buffered)")
            return None
        got += k
    return buf


def _read_frame(sock: socket.socket, accept: frozenset):
    """One whole frame as a wire event (HELLO exchange only), or None at a clean EOF."""
    raw = _recv_exact(sock, wire.HEADER.size)
    if raw is None:
        return None
    h = wire.parse_header(raw, 0, accept)
    body = _recv_exact(sock, h.body_len, wire.HEADER.size) if h.body_len else bytearray()
    return wire.parse_body(h, memoryview(body))


# -- provider ---------------------------------------------------------------------------------


class _DataConnection:
    """One accepted data socket, served by its own thread."""

    def __init__(self, provider: ProviderTransportImpl, sock: socket.socket, peer):
        self.provider = provider
        self.sock = sock
        self.peer = peer
        self.session: _TcpSession | None = None
        self.token: bytes | None = None
        self.core = _tcpwire.WireServer(sock.fileno())
        self.core.spin_ns = int(provider.spin_us * 1000)

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
            self.sock.close()

    def _serve(self) -> None:
        self.sock.settimeout(HELLO_TIMEOUT)
        ev = _read_frame(self.sock, wire.TO_PROVIDER)
        if ev is None:
            return
        if not isinstance(ev, wire.Hello):
            raise errors.ProtocolError(f"expected HELLO first, got {type(ev).__name__.upper()}")
        session = self.provider._session_for(ev.token)
        if session is None:
            self.provider._stats.error()
            self.shut(wire.E_BAD_TOKEN, "unknown or expired session token")
            return
        self.session, self.token = session, ev.token
        session._attach(self)
        self.sock.settimeout(None)
        if self.core.send_frame(wire.hello_ok()):
            self._check(self.core.serve(session.table))

    def _check(self, code: int) -> None:
        """Turn how ``WireServer.serve`` ended into an exception (or nothing for a clean end)."""
        a, _b, _c = self.core.detail()
        if code == _tcpwire.R_SHUT or (code == _tcpwire.R_EOF and a == 0):
            return
        if code == _tcpwire.R_EOF:
            raise errors.ProtocolError(f"connection closed inside a frame ({a} bytes buffered)")
        if code == _tcpwire.R_OS_ERROR:
            raise OSError(a, os.strerror(a))
        if code == _tcpwire.R_BAD_HEADER:
            h = wire.parse_header(self.core.header(), 0, wire.TO_PROVIDER)  # raises with the reason
            raise errors.ProtocolError("HELLO sent twice on one connection" if h.type == wire.HELLO
                                       else f"unexpected {wire.TYPE_NAMES[h.type]} frame")
        if code == _tcpwire.R_BAD_PAYLOAD:
            raise errors.ProtocolError(
                f"request payload of {a} bytes does not match the WRITE lengths of its operations")
        if code == _tcpwire.R_READ_LIMIT:
            raise errors.ProtocolError(f"batch reads {a} bytes; the limit is {wire.MAX_PAYLOAD}")
        if code == _tcpwire.R_NOMEM:
            raise MemoryError("cannot grow a data connection buffer")
        raise RuntimeError(f"unexpected result {code} from the data connection loop")


class _TcpSession(RegionTableSession):
    def __init__(self, provider: ProviderTransportImpl, session_id: str):
        self.provider = provider
        self.session_id = session_id
        self.table = _regions.RegionTable()
        self.tokens: set[bytes] = set()
        self.connections: dict[bytes, _DataConnection] = {}
        self.closed = False
        self._lock = threading.Lock()

    def accept(self, peer_params: dict) -> dict:
        if self.closed:
            raise errors.TransportError(f"session {self.session_id} is closed")
        token = secrets.token_bytes(wire.TOKEN_SIZE)
        with self._lock:
            self.tokens.add(token)
        self.provider._add_token(token, self)
        host, port = self.provider.address
        return {"host": host, "port": port, "token": token.hex()}

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

    def __init__(self, host: str = "127.0.0.1", port: int = 0, spin_us: float = DEFAULT_PROVIDER_SPIN_US):
        reason = unavailable_reason()
        if reason:
            raise errors.TransportUnavailable(reason)
        self.spin_us = spin_us
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

    def open_session(self, session_id: str) -> ProviderSession:
        return self._add_session(session_id, lambda: _TcpSession(self, session_id))

    def stats(self) -> dict:
        with self._lock:
            out = self._stats.snapshot(conn.core.counters() for conn in self._conns)
            out["connections"] = len(self._conns)
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
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _DataConnection(self, sock, peer)
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
            if self._sessions.get(session.session_id) is session:
                del self._sessions[session.session_id]


# -- requester --------------------------------------------------------------------------------


class TcpEndpoint(RegionTableEndpoint):
    name = "tcp"
    max_batch = wire.MAX_OPS
    max_outstanding = 16

    def __init__(self, spin_us: float = DEFAULT_SPIN_US):
        self._local = _regions.RegionTable()
        self._core = _tcpwire.WireRequester(self._local, self.max_outstanding, self.max_batch)
        self._core.spin_ns = int(spin_us * 1000)
        self._params: tuple[str, int, bytes] | None = None
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
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ProtocolError(f"tcp connect parameters need host, port and a hex token: {exc}") from exc
        if len(token) != wire.TOKEN_SIZE:
            raise errors.ProtocolError(f"tcp token must be {wire.TOKEN_SIZE} bytes, got {len(token)}")
        if self._closed:
            raise errors.TransportError("endpoint is closed")
        self._params = (host, port, token)
        self._dial()

    def recover(self) -> None:
        if self._params is None:
            raise errors.TransportError("recover() before connect()")
        if self._closed:
            raise errors.TransportError("endpoint is closed")
        self._dial()

    def _dial(self) -> None:
        self._disconnect("reconnecting")
        host, port, token = self._params
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise errors.ConnectionLost(f"cannot reach provider data port {host}:{port}: {exc}", exc.errno) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(wire.hello(token))
            ev = _read_frame(sock, wire.TO_REQUESTER)
            if ev is None:
                raise errors.ConnectionLost(f"provider {host}:{port} closed the connection during HELLO")
            if isinstance(ev, wire.Error):
                raise errors.ConnectionLost(f"provider {host}:{port} refused the connection ({ev.describe()})")
            if not isinstance(ev, wire.HelloOk):
                raise errors.ProtocolError(f"expected HELLO_OK, got {type(ev).__name__}")
        except OSError as exc:
            sock.close()
            raise errors.ConnectionLost(f"data connection to {host}:{port} failed: {exc}", exc.errno) from exc
        except errors.RramError:
            sock.close()
            raise
        sock.setblocking(False)
        self._core.attach(sock.fileno())
        self._sock, self._broken = sock, None

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
                wire.parse_header(core.header(), 0, wire.TO_REQUESTER)
                why = "unexpected header"
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
