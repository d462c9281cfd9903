"""One control connection on the provider: handshake, then requests, one thread each.

With TLS (the cluster's ``tls_dir``), the connection thread runs the TLS 1.3 handshake first,
under the same whole-handshake deadline as hello/auth; the accept loop never waits for it.  A
peer that speaks plaintext or garbage there is logged and dropped.  A peer that breaks the
protocol, fails authentication or stalls inside a frame gets an error reply saying why and is
dropped; nothing it does reaches other connections.  A connection
that ends without ``bye`` leaves its session detached: the provider keeps its leases for
``lease_grace`` seconds so the requester can ``resume``.
"""
from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time

from .. import errors
from .. import tls as T
from ..control import auth
from ..control import messages as M

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 16


class Refused(errors.RramError):
    """A request the provider declines with a specific error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def error_code(exc: BaseException) -> str:
    if isinstance(exc, Refused):
        return exc.code
    for cls, code in ((errors.CapacityError, "capacity"), (errors.NotFound, "not_found"),
                      (errors.ProtocolError, "bad_request"), (errors.AuthError, "auth"),
                      (errors.TransportError, "transport"), (errors.ConfigError, "bad_request")):
        if isinstance(exc, cls):
            return code
    return "internal"


class _Closed(Exception):
    """The peer closed the connection cleanly (between frames)."""


class ControlConnection:
    """Deadlines, all ``io_timeout``: the whole handshake from accept, each started frame from
    its first byte, each reply to leave (sendall's timeout is a total since Python 3.5).  Only
    the serving thread sets the socket's timeout; ``shut`` from other threads never blocks."""

    def __init__(self, provider, sock: socket.socket, peer, io_timeout: float, ticket):
        self.provider = provider
        self.sock = sock
        self.peer = f"{peer[0]}:{peer[1]}"
        self.io_timeout = io_timeout
        self.ticket = ticket
        self.session = None
        self._dec = M.Decoder("request", max_frame=M.MAX_HANDSHAKE_FRAME)
        self._pending: list[dict] = []
        self._send_lock = threading.Lock()
        self._closed = False
        self._deadline = time.monotonic() + io_timeout  # of the handshake, then of each frame

    # -- I/O ------------------------------------------------------------------------------------

    def send(self, msg: dict) -> None:
        data = M.encode(msg)
        with self._send_lock:
            if self._closed:
                return
            self.sock.settimeout(self.io_timeout)  # a peer that does not read is dropped
            self.sock.sendall(data)

    def _recv(self, *, handshake: bool) -> dict:
        while not self._pending:
            if not handshake and not self._dec.buffered:
                self._deadline = None  # idle between requests is fine once authenticated
            elif self._deadline is None:
                self._deadline = time.monotonic() + self.io_timeout  # a started frame must finish
            left = None if self._deadline is None else self._deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise socket.timeout
                self.sock.settimeout(left)
                # before authentication, never read more than one frame can hold
                data = self.sock.recv(M.MAX_HANDSHAKE_FRAME + M.LENGTH.size if handshake else RECV_SIZE)
            except socket.timeout:
                stage = "the handshake" if handshake else f"a frame ({self._dec.buffered} bytes received)"
                raise errors.ProtocolError(f"timed out after {self.io_timeout:g}s waiting for {stage}") from None
            if not data:
                if self._dec.buffered:
                    raise errors.ProtocolError(f"connection closed inside a frame ({self._dec.buffered} bytes)")
                raise _Closed()
            self._pending.extend(self._dec.feed(data))
        return self._pending.pop(0)

    def shut(self, code: str, message: str, msg_id: int = 0) -> None:
        """Say why and close; callable from any thread, idempotent, never waits on the peer.

        The reason goes out only if the socket takes it at once: a peer that stopped reading
        does not hold up a shutdown or lease cleanup.  A reply blocked in ``send`` on another
        thread fails when the socket is shut down under it."""
        data = M.encode(M.error_reply(msg_id, code, message))
        locked = self._send_lock.acquire(timeout=0.05)
        try:
            if locked and not self._closed:
                try:
                    self._send_now(data)
                except (OSError, ValueError):
                    pass
            self._closed = True
        finally:
            if locked:
                self._send_lock.release()
        T.shutdown(self.sock)

    def _send_now(self, data: bytes) -> None:
        """Send ``data`` only if the socket takes it without waiting."""
        if not isinstance(self.sock, ssl.SSLSocket):
            self.sock.send(data, socket.MSG_DONTWAIT)
            return
        # TLS has no MSG_DONTWAIT; a writable socket has room for one small record.  (This
        # write may run while the serving thread reads: OpenSSL keeps the two directions'
        # record state apart once the TLS 1.3 handshake is over, and writes are serialised.)
        if select.select((), (self.sock,), (), 0)[1]:
            self.sock.send(data)

    # -- the connection's life --------------------------------------------------------------------

    def serve(self) -> None:
        p = self.provider
        try:
            if p.tls is not None:
                self.sock = T.accept(p.tls, self.sock, self._deadline)
            self._handshake()
            self._requests()
        except _Closed:
            log.debug("control connection %s closed", self.peer)
        except errors.ProtocolError as exc:
            p.count("protocol_errors")
            log.warning("control connection %s: %s; dropping it", self.peer, exc)
            self.shut("bad_request", str(exc))
        except errors.AuthError as exc:
            p.count("auth_failures")
            log.warning("control connection %s: %s; dropping it", self.peer, exc)
            self.shut("auth", str(exc))
        except Refused as exc:  # a cap reached before the session began
            log.warning("control connection %s: %s; dropping it", self.peer, exc)
            self.shut(exc.code, str(exc))
        except (OSError, errors.ConnectionLost) as exc:
            log.info("control connection %s lost: %s", self.peer, exc)
        except Exception:
            log.exception("control connection %s failed; dropping it", self.peer)
            self.shut("internal", "internal error in the provider")
        finally:
            if self.session is not None:
                p.detach(self.session, self)
            with self._send_lock:
                self._closed = True
            self.sock.close()
            self.ticket.close()
            p.forget(self)

    def _handshake(self) -> None:
        p = self.provider
        hello = self._recv(handshake=True)
        if hello["type"] != "hello":
            raise errors.ProtocolError(f"expected hello first, got {hello['type']}")
        auth.check_nonce(hello["nonce"], "hello nonce")
        requester, role, generation = hello["requester"], hello["role"], hello["generation"]
        auth.check_identity(requester, role, generation)
        # the key is derived even for a revoked identity, so that the answer takes the same time
        key = auth.derive(p.master, requester, role, generation).key
        server_nonce = auth.new_nonce()
        self.send(M.reply(hello["id"], challenge=server_nonce))
        msg = self._recv(handshake=True)
        if msg["type"] != "auth":
            raise errors.ProtocolError(f"expected auth after hello, got {msg['type']}")
        expected = auth.requester_mac(key, server_nonce, hello["nonce"], requester)
        if not auth.verify(expected, msg["mac"]):
            raise errors.AuthError(f"authentication failed for {role} {requester!r}: wrong key")
        if p.cfg.is_revoked(requester, generation):
            raise errors.AuthError(f"the key of {role} {requester!r} (generation {generation}) is revoked")
        self.session = p.new_session(requester, role, generation, self,
                                     auth.session_secret(key, server_nonce, hello["nonce"]))
        self.ticket.authenticated()
        self._dec.max_frame = M.MAX_REQUEST_FRAME
        proof = auth.provider_proof(key, server_nonce, hello["nonce"], requester)
        self.send(M.reply(msg["id"], node=p.node.name, incarnation=p.incarnation, transport=p.transport_name,
                          capacity=p.pool.capacity, session=self.session.id, token=self.session.token,
                          proof=proof))
        log.info("%s %r authenticated from %s (session %s)", role, requester, self.peer, self.session.id)

    def _requests(self) -> None:
        while True:
            msg = self._recv(handshake=False)
            kind = msg["type"]
            self.provider.count("requests")
            try:
                fields = self._dispatch(kind, msg)
            except (errors.RramError, ValueError) as exc:
                code = error_code(exc)
                log.info("%s from %s refused (%s): %s", kind, self.peer, code, exc)
                self.send(M.error_reply(msg["id"], code, str(exc)))
                continue
            self.send(M.reply(msg["id"], **fields))
            if kind == "bye":
                return

    def _dispatch(self, kind: str, msg: dict) -> dict:
        p = self.provider
        if kind in ("hello", "auth"):
            raise Refused("state", f"{kind} is only allowed at the start of a connection")
        role = self.session.role  # a session exists from auth until bye, which ends the loop
        if kind not in auth.ROLES[role]:
            raise Refused("forbidden", f"{role} {self.session.requester} may not {kind}: its key's role "
                                       "does not allow it")
        if kind == "alloc_slab":
            slab = p.alloc(self.session, msg["size"])
            return {"lease": slab.lease_id, "addr": slab.arena.addr, "length": slab.length, "rkey": slab.rkey}
        if kind == "free_slab":
            return {"freed": p.free(self.session, msg["lease"])}
        if kind == "connect":
            return {"params": p.accept(self.session, msg["params"])}
        if kind == "stats":  # operators see everyone; a requester only its own sessions
            return {"stats": p.stats(None if role == "operator" else self.session.requester)}
        if kind == "heartbeat":
            return p.heartbeat(self.session)
        if kind == "resume":
            self.session = p.resume(self.session, msg["session"], msg["token"], self)
            return {"session": self.session.id, "token": self.session.token,
                    "leases": [{"lease": s.lease_id, "addr": s.arena.addr, "length": s.length, "rkey": s.rkey}
                               for s in self.session.slabs.values()]}
        if kind == "drain":
            return {"state": p.drain()}
        if kind == "reclaim":
            return p.reclaim(msg["bytes"])
        if kind == "report":
            return p.report(self.session, msg["degraded"])
        if kind == "undrain":
            return {"state": p.undrain()}
        if kind == "reload":
            return {"cut": p.reload()}
        if kind == "shutdown":
            return {"state": p.request_shutdown()}
        if kind == "bye":
            released = p.release(self.session, "bye")
            self.session = None
            return {"released": released}
        raise Refused("bad_request", f"unhandled request type {kind}")  # pragma: no cover - schema guards
