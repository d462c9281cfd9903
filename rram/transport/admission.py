"""Who may hold a connection to a provider: the caps that apply before anyone is authenticated.

A provider's control listener and its tcp data listener share one ``Admission``.  Every
accepted socket asks for a ``Ticket`` first; a peer over a cap is refused at once, in the
accept loop, without a thread or a buffer, and the reason is logged (at most once a second,
with how many were refused meanwhile, so a flood cannot flood the log too).

    total         every connection, control and data, authenticated or not
    per peer      from one IP address (an attacker on one host cannot take every slot)
    handshakes    connections that have not proven a credential yet; each has a deadline
                  (``io_timeout``) for its whole handshake, so these slots turn over

Caps that need an identity (sessions, data connections per requester) live with the owner of
the identity: the provider's control server.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .. import errors

log = logging.getLogger(__name__)


class Busy(errors.RramError):
    """A connection refused because a cap is reached; the message says which."""


@dataclass(frozen=True)
class Caps:
    max_connections: int = 256
    max_connections_per_peer: int = 64
    max_handshakes: int = 64


class Ticket:
    """One admitted connection; ``authenticated()`` when its peer is proven, ``close()`` at the end."""

    __slots__ = ("_admission", "peer", "_pending", "_closed")

    def __init__(self, admission: Admission, peer: str):
        self._admission = admission
        self.peer = peer
        self._pending = True
        self._closed = False

    def authenticated(self) -> None:
        with self._admission._lock:
            if self._pending and not self._closed:
                self._pending = False
                self._admission._handshakes -= 1

    def close(self) -> None:
        self._admission._release(self)


class Admission:
    def __init__(self, caps: Caps = Caps()):
        self.caps = caps
        self._lock = threading.Lock()
        self._total = 0
        self._handshakes = 0
        self._per_peer: dict[str, int] = {}
        self.refused = 0
        self._unlogged = 0
        self._last_log = 0.0

    def admit(self, peer: str, what: str) -> Ticket:
        """A ticket for a new ``what`` connection (control/data) from IP ``peer``, or Busy."""
        c = self.caps
        with self._lock:
            n_peer = self._per_peer.get(peer, 0)
            if self._total >= c.max_connections:
                why = f"{self._total} connections open (max_connections {c.max_connections})"
            elif n_peer >= c.max_connections_per_peer:
                why = f"{n_peer} connections from {peer} (max_connections_per_peer {c.max_connections_per_peer})"
            elif self._handshakes >= c.max_handshakes:
                why = f"{self._handshakes} connections still in their handshake (max_handshakes {c.max_handshakes})"
            else:
                self._total += 1
                self._handshakes += 1
                self._per_peer[peer] = n_peer + 1
                return Ticket(self, peer)
        self.refuse(peer, what, why)
        raise Busy(f"provider busy: {why}")

    def refuse(self, peer: str, what: str, why: str) -> None:
        """Count and log (rate-limited) one refused connection."""
        now = time.monotonic()
        with self._lock:
            self.refused += 1
            if now - self._last_log < 1.0:
                self._unlogged += 1
                return
            self._last_log, unlogged, self._unlogged = now, self._unlogged, 0
        more = f" ({unlogged} more refused in the last second)" if unlogged else ""
        log.warning("refused a %s connection from %s: %s%s", what, peer, why, more)

    def stats(self) -> dict:
        with self._lock:
            return {"connections": self._total, "handshakes": self._handshakes, "peers": len(self._per_peer),
                    "refused": self.refused}

    def _release(self, t: Ticket) -> None:
        with self._lock:
            if t._closed:
                return
            t._closed = True
            self._total -= 1
            if t._pending:
                self._handshakes -= 1
            n = self._per_peer[t.peer] - 1
            if n:
                self._per_peer[t.peer] = n
            else:
                del self._per_peer[t.peer]
