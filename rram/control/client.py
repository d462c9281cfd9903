"""The requester's control connection to one provider (blocking, thread-safe).

    client = ProviderClient(node, keys.credential(cfg, "host-1", "requester"), tls=rram.tls.cluster_client_context(cfg))
    client.connect()                                   # TLS (the provider's certificate), then hello/auth
    lease = client.alloc_slab(64 << 20)                # Lease(lease_id, RemoteRegion)
    ep.connect(client.connect_data(ep.local_params()))
    ...
    client.resume()                                    # after ConnectionLost: same leases back
    client.close()                                     # bye: the provider frees everything

Provider error codes become rram.errors exceptions; a broken or timed-out connection is
``ConnectionLost`` and the client keeps its session id and token for ``resume()``.

With a TLS context (the cluster has ``tls_dir``) every connection is TLS 1.3 and the provider
must show a certificate from the cluster CA for the node's *name*; the identity-key proof then
runs inside the channel.  A provider whose certificate fails is an AuthError.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from .. import errors, tls as T
from ..transport.base import RemoteRegion
from . import auth
from . import messages as M

log = logging.getLogger(__name__)

_ERRORS = {
    "auth": errors.AuthError,
    "forbidden": errors.Forbidden,
    "capacity": errors.CapacityError,
    "draining": errors.CapacityError,
    "not_found": errors.NotFound,
    "bad_request": errors.ProtocolError,
    "state": errors.ProtocolError,
    "transport": errors.TransportError,
    "shutdown": errors.ConnectionLost,
}


@dataclass(frozen=True)
class Lease:
    lease_id: int
    region: RemoteRegion


class ProviderClient:
    def __init__(self, node, credential: auth.Credential, *, tls: ssl.SSLContext | None, timeout: float = 5.0):
        self.node = node
        self.tls = tls  # None: plaintext (a cluster without tls_dir)
        self.credential = credential
        self.requester = credential.name
        self.timeout = timeout
        #: filled in by connect(): what the provider said about itself
        self.welcome: dict | None = None
        self.session: str | None = None
        self.token: str | None = None
        self._handshake_secret = self._session_secret = b""
        self._sock: socket.socket | None = None
        self._dec: M.Decoder | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def incarnation(self) -> int | None:
        """The provider's restart marker (its start time) as of our last authentication."""
        return None if self.welcome is None else self.welcome["incarnation"]

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def __repr__(self) -> str:
        return f"<ProviderClient {self.node.name} {self.node.address}:{self.node.port} session={self.session}>"

    # -- connection -----------------------------------------------------------------------------

    def connect(self) -> dict:
        """Dial and authenticate (a new session); returns the provider's welcome."""
        with self._held():
            self._dial()
            self.session, self.token = self.welcome["session"], self.welcome["token"]
            self._session_secret = self._handshake_secret  # kept across resume: same session
            return self.welcome

    def resume(self) -> list[Lease]:
        """Reconnect and reattach to the previous session's leases (inside lease_grace).

        Raises NotFound when the provider no longer has them (grace expired or it restarted).
        """
        with self._held():
            if self.session is None:
                raise errors.ProtocolError("resume() before a successful connect()")
            old = (self.session, self.token)
            self._dial()
            rep = self._call_locked("resume", session=old[0], token=old[1])
            self.session, self.token = rep["session"], rep["token"]
            return [Lease(item["lease"], RemoteRegion(item["addr"], item["length"], item["rkey"]))
                    for item in rep["leases"]]

    def close(self) -> None:
        """Idempotent: say bye (the provider releases every lease of the session) and hang up.

        Never waits longer than ``timeout`` for another thread's request (a heartbeat to a
        hung provider): the socket is shut under it instead, and the provider releases the
        leases after its lease_grace.
        """
        if self._closed:
            return
        self._closed = True
        if not self._lock.acquire(timeout=self.timeout):
            sock = self._sock
            if sock is not None:
                T.shutdown(sock)  # wakes the thread blocked in recv
            return
        try:
            if self._sock is not None:
                try:
                    self._call_locked("bye")
                except errors.RramError as exc:
                    log.debug("bye to %s failed: %s", self.node.name, exc)
            self._hangup()
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _held(self):
        """The connection, to this thread alone; hung up as it leaves if closed meanwhile (a
        ``close`` or ``abort`` that could not wait for us shut the socket under us)."""
        with self._lock:
            try:
                yield
            finally:
                if self._closed:
                    self._hangup()

    def abort(self) -> None:
        """Idempotent: hang up at once, without a goodbye, for a provider declared dead.

        It may be hung, and a goodbye (or another thread's heartbeat holding the connection)
        would wait for it up to ``timeout`` while the caller holds the store's lock.  The
        socket is shut under any thread blocked on it; the provider releases the leases
        after its lease_grace.
        """
        if self._closed:
            return
        self._closed = True
        sock = self._sock
        if sock is not None:
            T.shutdown(sock)  # wakes a thread blocked in recv; it hangs up as it leaves
        if self._lock.acquire(blocking=False):
            try:
                self._hangup()
            finally:
                self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests -------------------------------------------------------------------------------

    def alloc_slab(self, size: int) -> Lease:
        rep = self._call("alloc_slab", size=int(size))
        return Lease(rep["lease"], RemoteRegion(rep["addr"], rep["length"], rep["rkey"]))

    def free_slab(self, lease) -> None:
        lease_id = lease.lease_id if isinstance(lease, Lease) else int(lease)
        self._call("free_slab", lease=lease_id)

    def connect_data(self, params: dict) -> dict:
        """Pass an endpoint's ``local_params()`` to the provider's transport session; its reply,
        plus the session's secret (derived here, never sent) for the endpoint to prove."""
        reply = self._call("connect", params=params)["params"]
        return {**reply, "session_secret": self._session_secret.hex()}

    def stats(self) -> dict:
        return self._call("stats")["stats"]

    def heartbeat(self, timeout: float | None = None) -> dict:
        """The provider's state; ``timeout`` (default: the client's) bounds this one request."""
        rep = self._call("heartbeat", _timeout=timeout)
        out = {k: rep[k] for k in ("incarnation", "capacity", "free", "load", "state")}
        out["reclaim"] = rep.get("reclaim", 0)  # bytes the provider asks us to give back
        return out

    def report(self, degraded: int) -> None:
        """Tell the provider how many of our slabs are degraded (shown by ``rram status``)."""
        self._call("report", degraded=int(degraded))

    def reclaim(self, nbytes: int) -> dict:
        """Ask the provider to give ``nbytes`` of its capacity back (``rram reclaim``)."""
        return self._call("reclaim", bytes=int(nbytes))

    def shutdown(self) -> str:
        """Ask a drained provider to exit."""
        return self._call("shutdown")["state"]

    def drain(self) -> str:
        return self._call("drain")["state"]

    def undrain(self) -> str:
        return self._call("undrain")["state"]

    def reload(self) -> int:
        """Ask the provider to re-read its cluster file (revocations, quotas); sessions it cut."""
        return self._call("reload")["cut"]

    # -- internals ------------------------------------------------------------------------------

    def _call(self, kind: str, _timeout: float | None = None, **fields) -> dict:
        with self._held():
            if self._closed:
                raise errors.ConnectionLost(f"client for {self.node.name} is closed")
            if self._sock is None:
                raise errors.ConnectionLost(f"not connected to provider {self.node.name} (connect() or resume())")
            if _timeout is None:
                return self._call_locked(kind, **fields)
            self._sock.settimeout(_timeout)
            try:
                return self._call_locked(kind, _timeout=_timeout, **fields)
            finally:
                if self._sock is not None:
                    self._sock.settimeout(self.timeout)

    def _call_locked(self, kind: str, _timeout: float | None = None, **fields) -> dict:
        msg_id = next(self._ids)
        try:
            self._sock.sendall(M.encode(M.request(kind, msg_id, **fields)))
            while True:
                for rep in self._read():
                    if rep["re"] == msg_id:
                        return self._result(kind, rep)
                    if rep["re"] == 0 and not rep["ok"]:  # unsolicited: the provider is dropping us
                        self._raise(rep)
                    log.debug("%s: ignoring a late reply to request %d", self.node.name, rep["re"])
        except socket.timeout as exc:
            self._hangup()
            raise errors.ConnectionLost(f"provider {self.node.name} did not answer {kind} "
                                        f"within {_timeout or self.timeout:g}s") from exc
        except OSError as exc:
            self._hangup()
            raise errors.ConnectionLost(f"control connection to {self.node.name} lost during {kind}: {exc}") from exc
        except errors.ProtocolError:
            self._hangup()
            raise

    def _read(self) -> list[dict]:
        data = self._sock.recv(1 << 16)
        if not data:
            raise ConnectionResetError("provider closed the connection")
        return self._dec.feed(data)

    def _result(self, kind: str, rep: dict) -> dict:
        if not rep["ok"]:
            self._raise(rep)
        M.check_reply(kind, rep)
        return {k: v for k, v in rep.items() if k not in ("v", "re", "ok")}

    def _raise(self, rep: dict):
        code, message = rep["error"]["code"], rep["error"]["message"]
        cls = _ERRORS.get(code, errors.RramError)
        if cls in (errors.AuthError, errors.ConnectionLost):
            self._hangup()
        raise cls(f"provider {self.node.name}: {message}" + ("" if code in _ERRORS else f" ({code})"))

    def _dial(self) -> None:
        if self._closed:
            raise errors.ConnectionLost(f"client for {self.node.name} is closed")
        self._hangup()
        addr = (self.node.address, self.node.port)
        try:
            sock = socket.create_connection(addr, timeout=self.timeout)
        except OSError as exc:
            raise errors.ConnectionLost(f"cannot reach provider {self.node.name} at {addr[0]}:{addr[1]}: "
                                        f"{exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self._start_tls(sock)
        self._sock, self._dec = sock, M.Decoder("reply")
        try:
            self.welcome = self._authenticate()
        except BaseException:
            self._hangup()
            raise

    def _start_tls(self, sock: socket.socket) -> ssl.SSLSocket:
        """TLS on ``sock`` within ``timeout``: the certificate must be the CA's for this node's name."""
        try:
            tls_sock = self.tls.wrap_socket(sock, server_hostname=self.node.name, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            sock.close()
            raise errors.ConnectionLost(f"provider {self.node.name}: cannot start TLS: {exc}") from exc
        try:
            T.handshake(tls_sock, time.monotonic() + self.timeout)
        except errors.RramError as exc:
            tls_sock.close()
            # a provider over a connection cap answers in plaintext before any TLS: say it may be that
            hint = " (a plaintext provider, or one refusing connections at a cap?)" \
                if isinstance(exc, errors.ProtocolError) else ""
            raise type(exc)(f"provider {self.node.name} at {self.node.address}:{self.node.port}: {exc}{hint}") \
                from None
        tls_sock.settimeout(self.timeout)
        return tls_sock

    def _authenticate(self) -> dict:
        nonce, cred = auth.new_nonce(), self.credential
        challenge = self._call_locked("hello", requester=cred.name, role=cred.role, generation=cred.generation,
                                      nonce=nonce)["challenge"]
        mac = auth.requester_mac(cred.key, challenge, nonce, cred.name)
        welcome = self._call_locked("auth", mac=mac)
        expected = auth.provider_proof(cred.key, challenge, nonce, cred.name)
        if not auth.verify(expected, welcome["proof"]):
            raise errors.AuthError(f"provider {self.node.name} failed to prove it knows the cluster's keys")
        self._handshake_secret = auth.session_secret(cred.key, challenge, nonce)
        log.debug("authenticated to %s (session %s, incarnation %d)", self.node.name, welcome["session"],
                  welcome["incarnation"])
        return welcome

    def _hangup(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
