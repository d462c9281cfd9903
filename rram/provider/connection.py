"""One control connection on the provider: handshake, then requests, one thread each.

A peer that breaks the protocol, fails authentication or stalls inside a frame gets an error
reply saying why and is dropped; nothing it does reaches other connections.  A connection
that ends without ``bye`` leaves its session detached: the provider keeps its leases for
``lease_grace`` seconds so the requester can ``resume``.
"""
from __future__ import annotations

import logging
import socket
import threading

from .. import errors
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
    def __init__(self, provider, sock: socket.socket, peer, io_timeout: float):
        self.provider = provider
        self.sock = sock
        self.peer = f"{peer[0]}:{peer[1]}"
        self.io_timeout = io_timeout
        self.session = None
        self._dec = M.Decoder("request")
        self._pending: list[dict] = []
        self._send_lock = threading.Lock()
        self._closed = False

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
            # idle between requests is fine once authenticated; a started frame must finish
            self.sock.settimeout(self.io_timeout if handshake or self._dec.buffered else None)
            try:
                data = self.sock.recv(RECV_SIZE)
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
        """Say why and close; callable from any thread, idempotent."""
        try:
            self.send(M.error_reply(msg_id, code, message))
        except (OSError, errors.ProtocolError):
            pass
        with self._send_lock:
            self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- the connection's life --------------------------------------------------------------------

    def serve(self) -> None:
        p = self.provider
        try:
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
        except OSError as exc:
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
            p.forget(self)

    def _handshake(self) -> None:
        p = self.provider
        hello = self._recv(handshake=True)
        if hello["type"] != "hello":
            raise errors.ProtocolError(f"expected hello first, got {hello['type']}")
        auth.check_nonce(hello["nonce"], "hello nonce")
        requester = hello["requester"]
        if not 0 < len(requester) <= 200:
            raise errors.ProtocolError("hello requester name must be 1..200 characters")
        server_nonce = auth.new_nonce()
        self.send(M.reply(hello["id"], challenge=server_nonce))
        msg = self._recv(handshake=True)
        if msg["type"] != "auth":
            raise errors.ProtocolError(f"expected auth after hello, got {msg['type']}")
        expected = auth.requester_mac(p.secret, server_nonce, hello["nonce"], requester)
        if not auth.verify(expected, msg["mac"]):
            raise errors.AuthError(f"authentication failed for requester {requester!r}: wrong cluster secret")
        self.session = p.new_session(requester, self)
        proof = auth.provider_proof(p.secret, server_nonce, hello["nonce"], requester)
        self.send(M.reply(msg["id"], node=p.node.name, incarnation=p.incarnation, transport=p.transport_name,
                          capacity=p.pool.capacity, session=self.session.id, token=self.session.token,
                          proof=proof))
        log.info("requester %r authenticated from %s (session %s)", requester, self.peer, self.session.id)

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
        if kind == "alloc_slab":
            slab = p.alloc(self.session, msg["size"])
            return {"lease": slab.lease_id, "addr": slab.arena.addr, "length": slab.length, "rkey": slab.rkey}
        if kind == "free_slab":
            return {"freed": p.free(self.session, msg["lease"])}
        if kind == "connect":
            return {"params": p.accept(self.session, msg["params"])}
        if kind == "stats":
            return {"stats": p.stats()}
        if kind == "heartbeat":
            return p.heartbeat()
        if kind == "resume":
            self.session = p.resume(self.session, msg["session"], msg["token"], self)
            return {"session": self.session.id, "token": self.session.token,
                    "leases": [{"lease": s.lease_id, "addr": s.arena.addr, "length": s.length, "rkey": s.rkey}
                               for s in self.session.slabs.values()]}
        if kind == "drain":
            return {"state": p.drain()}
        if kind == "shutdown":
            return {"state": p.request_shutdown()}
        if kind == "bye":
            released = p.release(self.session, "bye")
            self.session = None
            return {"released": released}
        raise Refused("bad_request", f"unhandled request type {kind}")  # pragma: no cover - schema guards
