"""One-sided READ/WRITE emulated over TCP.

Provider: one data listener; ``session.accept({})`` mints a random token bound to the session
and returns ``{"host", "port", "token"}``.  The requester dials, sends the token (HELLO) and
waits for HELLO_OK; the connection then belongs to that session and can only reach its
regions.  A token stays valid while its session lives, so ``recover()`` re-dials with it; a
new dial with a token replaces that token's previous connection.  One thread per data
connection: receive a REQUEST into the decoder's buffer, one C call executes it (GIL
released), one ``sendall`` returns the COMPLETION.

Requester: ``post`` gathers descriptors and WRITE data into a send buffer in C and sends one
frame; ``poll`` reads completions in the calling thread (no reader thread: a cross-thread
wake-up costs more than the round trip) and scatters READ data in C.  Batches pipeline: the
provider answers them in order.  Frames are described in wire.py.
"""
from __future__ import annotations

import collections
import logging
import math
import secrets
import select
import socket
import sys
import threading
import time

import numpy as np

from .. import errors
from . import wire
from .base import (
    OP_DTYPE,
    WC_LOC_PROT_ERR,
    WC_SUCCESS,
    Endpoint,
    ProviderSession,
    ProviderTransport,
    RequesterTransport,
)

try:
    from .._ext import _memops
except ImportError as exc:  # pragma: no cover - setup.py builds it unconditionally
    _memops = None
    _IMPORT_ERROR = exc

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0


def unavailable_reason() -> str | None:
    if _memops is None:
        return f"rram._ext._memops is not built ({_IMPORT_ERROR}); run `python setup.py build_ext --inplace`"
    if sys.byteorder != "little":
        return "the tcp data protocol is little-endian and this host is not"
    return None


def _ops_bytes(ops: np.ndarray, max_batch: int) -> np.ndarray:
    """The uint8 view of a checked 1-D OP_DTYPE batch."""
    if not isinstance(ops, np.ndarray) or ops.dtype != OP_DTYPE or ops.ndim != 1:
        raise errors.TransportError("ops must be a 1-D numpy array of OP_DTYPE")
    if not 1 <= len(ops) <= max_batch:
        raise errors.TransportError(f"a batch holds 1..{max_batch} operations, got {len(ops)}")
    return np.ascontiguousarray(ops).view(np.uint8)


# -- provider ---------------------------------------------------------------------------------


class _Stats:
    FIELDS = ("ops", "batches", "bytes_read", "bytes_written", "errors")

    def __init__(self):
        self._lock = threading.Lock()
        self._c = dict.fromkeys(self.FIELDS, 0)

    def batch(self, ops: int, nread: int, nwritten: int, failed: bool) -> None:
        with self._lock:
            c = self._c
            c["batches"] += 1
            c["ops"] += ops
            c["bytes_read"] += nread
            c["bytes_written"] += nwritten
            c["errors"] += failed

    def error(self) -> None:
        with self._lock:
            self._c["errors"] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._c)


class _DataConnection:
    """One accepted data socket, served by its own thread."""

    def __init__(self, provider: ProviderTransportImpl, sock: socket.socket, peer):
        self.provider = provider
        self.sock = sock
        self.peer = peer
        self.session: _TcpSession | None = None
        self.token: bytes | None = None
        self._send_lock = threading.Lock()
        self._closed = False
        self._out = bytearray(1 << 16)

    def send(self, data) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def shut(self, code: int, message: str) -> None:
        """Tell the peer why, then close (callable from any thread, idempotent)."""
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(wire.error(code, message))
            except OSError:
                pass
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
            with self._send_lock:
                self._closed = True
            self.sock.close()

    def _serve(self) -> None:
        dec = wire.Decoder(wire.TO_PROVIDER)
        self.sock.settimeout(HELLO_TIMEOUT)
        ev = self._next(dec)
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
        self.send(wire.hello_ok())
        while True:
            ev = self._next(dec)
            if ev is None:
                return
            if not isinstance(ev, wire.Request):
                raise errors.ProtocolError("HELLO sent twice on one connection")
            self._execute(ev)

    def _next(self, dec: wire.Decoder):
        """The next event, receiving as needed; None when the peer closed cleanly."""
        while True:
            ev = dec.next_event()
            if ev is not None:
                return ev
            n = self.sock.recv_into(dec.writable())
            if n == 0:
                if dec.buffered:
                    raise errors.ProtocolError(f"connection closed inside a frame ({dec.buffered} bytes buffered)")
                return None
            dec.wrote(n)

    def _execute(self, req: wire.Request) -> None:
        table = self.session.table
        while True:
            out = self._out
            status, index, nread, nwritten = _memops.execute_wire(
                table, req.ops, req.count, req.payload, out, wire.HEADER.size, wire.MAX_OP_LENGTH
            )
            if status != _memops.MALFORMED_SHORT_OUTPUT:
                break
            if index > wire.MAX_PAYLOAD:
                raise errors.ProtocolError(f"batch reads {index} bytes; the limit is {wire.MAX_PAYLOAD}")
            self._out = bytearray(wire.HEADER.size + index)
        if status == _memops.MALFORMED_PAYLOAD:
            raise errors.ProtocolError(
                f"request payload of {len(req.payload)} bytes does not match the WRITE lengths of its operations"
            )
        self.provider._stats.batch(index, nread, nwritten, status != WC_SUCCESS)
        wire.pack_header(out, wire.COMPLETION, req.batch_id, index, status, nread)
        self.send(memoryview(out)[: wire.HEADER.size + nread])


class _TcpSession(ProviderSession):
    def __init__(self, provider: ProviderTransportImpl, session_id: str):
        self.provider = provider
        self.session_id = session_id
        self.table = _memops.RegionTable()
        self.tokens: set[bytes] = set()
        self.connections: dict[bytes, _DataConnection] = {}
        self.closed = False
        self._lock = threading.Lock()

    def register(self, addr: int, length: int) -> int:
        if self.closed:
            raise errors.TransportError(f"session {self.session_id} is closed")
        try:
            return self.table.register(addr, length)
        except (ValueError, OverflowError) as exc:
            raise errors.TransportError(f"cannot register region: {exc}") from exc

    def deregister(self, rkey: int) -> None:
        if not self.table.deregister(rkey):
            raise errors.NotFound(f"rkey {rkey:#x} is not registered in session {self.session_id}")

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

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        reason = unavailable_reason()
        if reason:
            raise errors.TransportUnavailable(reason)
        try:
            self._listener = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise errors.os_error(f"cannot listen on {host}:{port}", exc.errno or 0) from exc
        self.address = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._sessions: dict[str, _TcpSession] = {}
        self._tokens: dict[bytes, _TcpSession] = {}
        self._conns: set[_DataConnection] = set()
        self._stats = _Stats()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"rram-tcp-listen-{self.address[1]}",
                                        daemon=True)
        self._thread.start()

    def open_session(self, session_id: str) -> ProviderSession:
        with self._lock:
            if self._closed:
                raise errors.TransportError("the tcp transport is closed")
            if session_id in self._sessions:
                raise errors.TransportError(f"session {session_id!r} is already open")
            session = self._sessions[session_id] = _TcpSession(self, session_id)
        return session

    def stats(self) -> dict:
        out = self._stats.snapshot()
        with self._lock:
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
        with self._lock:
            self._conns.discard(conn)

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


class TcpEndpoint(Endpoint):
    name = "tcp"
    max_batch = wire.MAX_OPS
    max_outstanding = 16

    def __init__(self):
        self._local = _memops.RegionTable()
        self._params: tuple[str, int, bytes] | None = None
        self._sock: socket.socket | None = None
        self._poller = select.poll()
        self._dec = wire.Decoder(wire.TO_REQUESTER)
        self._eof = False
        self._broken: str | None = "not connected"
        # per posted batch: [batch_id, ops sent to the provider, their OP_DTYPE bytes, cut by lkey]
        self._pending: collections.deque = collections.deque()
        self._sendbuf = bytearray(1 << 16)
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
            dec = wire.Decoder(wire.TO_REQUESTER)
            ev = None
            while ev is None:
                n = sock.recv_into(dec.writable())
                if n == 0:
                    raise errors.ConnectionLost(f"provider {host}:{port} closed the connection during HELLO")
                dec.wrote(n)
                ev = dec.next_event()
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
        self._sock, self._dec, self._eof, self._broken = sock, dec, False, None
        self._poller.register(sock, select.POLLIN)

    def _disconnect(self, why: str) -> None:
        self._broken = why
        self._pending.clear()
        if self._sock is not None:
            try:
                self._poller.unregister(self._sock)
            except KeyError:
                pass
            self._sock.close()
            self._sock = None

    def _lost(self, why: str, cause: BaseException | None = None) -> errors.ConnectionLost:
        self._disconnect(why)
        err = errors.ConnectionLost(why, getattr(cause, "errno", None))
        err.__cause__ = cause
        return err

    def _usable(self) -> None:
        if self._broken is not None:
            raise errors.ConnectionLost(f"tcp endpoint unusable ({self._broken}); call recover()")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._disconnect("closed")
        self._local.clear()

    # -- local regions ------------------------------------------------------------------------

    def register_local(self, addr: int, length: int) -> int:
        try:
            return self._local.register(addr, length)
        except (ValueError, OverflowError) as exc:
            raise errors.TransportError(f"cannot register local buffer: {exc}") from exc

    def deregister_local(self, lkey: int) -> None:
        if not self._local.deregister(lkey):
            raise errors.NotFound(f"lkey {lkey:#x} is not registered on this endpoint")

    # -- data path ----------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def post(self, ops: np.ndarray, batch_id: int) -> None:
        self._usable()
        if len(self._pending) >= self.max_outstanding:
            raise errors.TransportError(f"{self.max_outstanding} batches already outstanding; poll first")
        raw = _ops_bytes(ops, self.max_batch)
        n = len(ops)
        nwrite, nread = _memops.measure(raw, n)
        if nwrite > wire.MAX_PAYLOAD or nread > wire.MAX_PAYLOAD:
            raise errors.TransportError(
                f"batch moves {nwrite} bytes out and {nread} in; the tcp limit is {wire.MAX_PAYLOAD} each way"
            )
        need = wire.HEADER.size + n * wire.WIRE_OP.itemsize + nwrite
        if need > len(self._sendbuf):
            self._sendbuf = bytearray(need)
        sent, used = _memops.gather(self._local, raw, n, self._sendbuf, wire.HEADER.size)
        if sent:
            payload = used - sent * wire.WIRE_OP.itemsize
            wire.pack_header(self._sendbuf, wire.REQUEST, batch_id, sent, 0, payload)
            self._send(memoryview(self._sendbuf)[: wire.HEADER.size + used])
        self._pending.append((batch_id, sent, raw[: sent * OP_DTYPE.itemsize].copy(), sent < n))

    def _send(self, view: memoryview) -> None:
        """Send all of ``view``; while the socket is full, take in completions so neither side
        blocks on the other's full buffer."""
        sock = self._sock
        while len(view):
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                ready = select.select([sock], [sock], [], None)
                if ready[0]:
                    self._fill()
            except OSError as exc:
                raise self._lost(f"send to provider failed: {exc}", exc) from exc

    def _fill(self) -> bool:
        """Receive what is available into the decoder; False when nothing was."""
        if self._eof:
            return False
        try:
            n = self._sock.recv_into(self._dec.writable())
        except BlockingIOError:
            return False
        except OSError as exc:
            raise self._lost(f"receive from provider failed: {exc}", exc) from exc
        if n == 0:
            self._eof = True
            return False
        self._dec.wrote(n)
        return True

    def poll(self, out: np.ndarray, timeout: float | None = None) -> int:
        self._usable()
        if timeout is None and not self._pending:
            raise errors.TransportError("poll() without a timeout and nothing outstanding would wait forever")
        deadline = None if timeout is None else time.monotonic() + timeout
        cap = len(out)
        got = 0
        while got < cap:
            if self._pending and self._pending[0][1] == 0:  # failed the lkey check before sending
                bid = self._pending.popleft()[0]
                out[got] = (bid, WC_LOC_PROT_ERR, 0)
                got += 1
                continue
            try:
                ev = self._dec.next_event()
            except errors.ProtocolError as exc:
                raise self._lost(f"bad frame from provider: {exc}", exc) from exc
            if ev is not None:
                out[got] = self._complete(ev)
                got += 1
                continue
            if got:
                break
            if self._fill():
                continue
            if self._eof:
                raise self._lost("provider closed the data connection")
            left = -1 if deadline is None else deadline - time.monotonic()
            if deadline is not None and left <= 0:
                return 0
            self._poller.poll(-1 if deadline is None else math.ceil(left * 1000))
        return got

    def _complete(self, ev) -> tuple[int, int, int]:
        if isinstance(ev, wire.Error):
            raise self._lost(f"provider closed the data connection ({ev.describe()})")
        if not self._pending or self._pending[0][1] == 0 or ev.batch_id != self._pending[0][0]:
            expected = self._pending[0][0] if self._pending else None
            raise self._lost(f"completion for batch {ev.batch_id} while expecting {expected}")
        bid, sent, raw, cut = self._pending[0]
        status, index = ev.status, ev.index
        done = sent if status == WC_SUCCESS else index
        if done > sent:
            raise self._lost(f"completion for batch {bid} names op {index} of {sent}")
        self._pending.popleft()
        lstatus, lindex = _memops.scatter(self._local, raw, done, ev.data)
        if lstatus == _memops.MALFORMED_PAYLOAD:
            raise self._lost(f"completion for batch {bid} carries {len(ev.data)} bytes, not its READ lengths")
        if lstatus != WC_SUCCESS:
            return bid, lstatus, lindex
        if status == WC_SUCCESS and cut:
            return bid, WC_LOC_PROT_ERR, sent
        return bid, status, index


class RequesterTransportImpl(RequesterTransport):
    name = "tcp"

    def __init__(self):
        reason = unavailable_reason()
        if reason:
            raise errors.TransportUnavailable(reason)

    def endpoint(self) -> Endpoint:
        return TcpEndpoint()
