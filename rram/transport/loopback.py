"""In-process transport: provider and requester share one process.

``session.accept({})`` returns ``{"loopback_id": ...}``, a random id in a module registry;
the endpoint looks the session up by it.  ``post`` runs the batch at once through the same
C executor checks as the tcp provider (lkey, rkey, bounds, length; GIL released) and queues
the completion; ``poll`` hands queued completions back in order.  What it shares with tcp (the
availability check, the batch check, the provider counters) lives in emulated.py.
"""
from __future__ import annotations

import collections
import secrets
import threading
import time

import numpy as np

from .. import errors
from .base import (
    Endpoint,
    ProviderSession,
    ProviderTransport,
    RegionTableEndpoint,
    RegionTableSession,
    RequesterTransport,
)
from .emulated import ProviderStats, ops_bytes, unavailable_reason
from .wire import MAX_OP_LENGTH

try:
    from .._ext import _regions
except ImportError:  # pragma: no cover - unavailable_reason() says why
    _regions = None

_registry_lock = threading.Lock()
_registry: dict[str, _LoopbackSession] = {}


class _LoopbackSession(RegionTableSession):
    def __init__(self, provider: ProviderTransportImpl, session_id: str):
        self.provider = provider
        self.session_id = session_id
        self.table = _regions.RegionTable()
        self.ids: set[str] = set()
        self.closed = False

    def accept(self, peer_params: dict) -> dict:
        if self.closed:
            raise errors.TransportError(f"session {self.session_id} is closed")
        conn_id = secrets.token_hex(16)
        with _registry_lock:
            _registry[conn_id] = self
            self.ids.add(conn_id)
        return {"loopback_id": conn_id}

    def close(self) -> None:
        with _registry_lock:
            if self.closed:
                return
            self.closed = True
            for conn_id in self.ids:
                _registry.pop(conn_id, None)
        self.table.clear()
        self.provider._drop(self)


class ProviderTransportImpl(ProviderTransport):
    name = "loopback"

    def __init__(self):
        reason = unavailable_reason()
        if reason:
            raise errors.TransportUnavailable(reason)
        self._lock = threading.Lock()
        self._sessions: dict[str, _LoopbackSession] = {}
        self._stats = ProviderStats()
        self._closed = False

    def open_session(self, session_id: str, secret: bytes | None = None) -> ProviderSession:  # in-process: unused
        return self._add_session(session_id, lambda: _LoopbackSession(self, session_id))

    def stats(self) -> dict:
        out = self._stats.snapshot()
        with _registry_lock, self._lock:
            out["connections"] = sum(len(s.ids) for s in self._sessions.values())
            out["regions"] = sum(len(s.table) for s in self._sessions.values())
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
        for session in sessions:
            session.close()


class LoopbackEndpoint(RegionTableEndpoint):
    name = "loopback"
    max_batch = 4096
    max_outstanding = 16

    def __init__(self):
        self._local = _regions.RegionTable()
        self._conn_id: str | None = None
        self._session: _LoopbackSession | None = None
        self._done: collections.deque = collections.deque()
        self._closed = False

    def local_params(self) -> dict:
        return {}

    def connect(self, remote_params: dict) -> None:
        try:
            self._conn_id = str(remote_params["loopback_id"])
        except (KeyError, TypeError) as exc:
            raise errors.ProtocolError(f"loopback connect parameters need loopback_id: {exc}") from exc
        self.recover()

    def recover(self) -> None:
        if self._closed:
            raise errors.TransportError("endpoint is closed")
        if self._conn_id is None:
            raise errors.TransportError("recover() before connect()")
        self._done.clear()
        with _registry_lock:
            self._session = _registry.get(self._conn_id)
        if self._session is None:
            raise errors.ConnectionLost(f"loopback session for {self._conn_id} no longer exists")

    @property
    def outstanding(self) -> int:
        return len(self._done)

    def post(self, ops: np.ndarray, batch_id: int) -> None:
        session = self._session
        if session is None or session.closed or self._closed:
            self._session = None
            raise errors.ConnectionLost("loopback endpoint is not connected (session closed?); call recover()")
        if len(self._done) >= self.max_outstanding:
            raise errors.TransportError(f"{self.max_outstanding} batches already outstanding; poll first")
        raw = ops_bytes(ops, self.max_batch)
        status, index, nread, nwritten = _regions.execute_direct(session.table, self._local, raw, len(ops),
                                                                 MAX_OP_LENGTH)
        session.provider._stats.batch(index, nread, nwritten, status != 0)
        self._done.append((batch_id, status, index))

    def poll(self, out: np.ndarray, timeout: float | None = None) -> int:
        if self._closed:
            raise errors.ConnectionLost("loopback endpoint is closed")
        if not self._done:
            if timeout is None:
                raise errors.TransportError("poll() without a timeout and nothing outstanding would wait forever")
            time.sleep(timeout)  # nothing can complete meanwhile: batches complete when posted
            return 0
        got = min(len(out), len(self._done))
        for i in range(got):
            out[i] = self._done.popleft()
        return got

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._session = None
        self._done.clear()
        self._local.clear()


class RequesterTransportImpl(RequesterTransport):
    name = "loopback"

    def __init__(self):
        reason = unavailable_reason()
        if reason:
            raise errors.TransportUnavailable(reason)

    def endpoint(self) -> Endpoint:
        return LoopbackEndpoint()
