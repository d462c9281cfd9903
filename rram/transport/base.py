"""The transport interface, shaped after verbs so that RDMA slots in unchanged.

A provider registers memory regions (address, length) and hands out remote keys; a
requester connects an :class:`Endpoint`, registers its local buffers, posts *batches* of
one-sided READ/WRITE operations and polls one completion per batch.

Operations and completions travel as numpy structured arrays (``OP_DTYPE`` and
``COMPLETION_DTYPE``) so that a batch crosses the C boundary as one buffer, never as one
Python object per page.  Status codes follow libibverbs' ``enum ibv_wc_status`` in every
transport.

Connection set-up is a two-message exchange carried by the provider's control connection:

    ep = requester_transport.endpoint()
    reply = control.connect(ep.local_params())      # provider: session.accept(params)
    ep.connect(reply)

Semantics every implementation honours (tests/conformance checks them):
  * operations of one batch execute in order; a batch completes once, with the status of
    its first failing operation (``index``) or ``WC_SUCCESS``; operations after a failing
    one are not executed;
  * a bad remote key or an address range outside the registered region fails with
    ``WC_REM_ACCESS_ERR`` and never touches other memory; a local buffer outside its
    local region fails with ``WC_LOC_PROT_ERR``;
  * after an error completion the endpoint may be unusable (verbs: QP in error);
    ``Endpoint.recover()`` brings it back, on a new connection if need be;
  * a region deregistered by the provider cannot be accessed afterwards.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass

import numpy as np

from .. import errors

OP_READ = 0
OP_WRITE = 1

#: one one-sided operation; 32 bytes, mirrored by ``op_t`` in ext/*.pyx
OP_DTYPE = np.dtype(
    [
        ("local_addr", "<u8"),
        ("remote_addr", "<u8"),
        ("length", "<u4"),
        ("lkey", "<u4"),
        ("rkey", "<u4"),
        ("opcode", "u1"),
        ("_pad", "u1", (3,)),
    ]
)
assert OP_DTYPE.itemsize == 32

#: one completion per batch; 16 bytes, mirrored by ``completion_t`` in ext/*.pyx
COMPLETION_DTYPE = np.dtype([("batch_id", "<u8"), ("status", "<i4"), ("index", "<u4")])
assert COMPLETION_DTYPE.itemsize == 16

# enum ibv_wc_status (infiniband/verbs.h)
WC_SUCCESS = 0
WC_LOC_LEN_ERR = 1
WC_LOC_QP_OP_ERR = 2
WC_LOC_PROT_ERR = 4
WC_WR_FLUSH_ERR = 5
WC_LOC_ACCESS_ERR = 8
WC_REM_INV_REQ_ERR = 9
WC_REM_ACCESS_ERR = 10
WC_REM_OP_ERR = 11
WC_RETRY_EXC_ERR = 12
WC_RNR_RETRY_EXC_ERR = 13
WC_FATAL_ERR = 19
WC_GENERAL_ERR = 21

WC_STATUS_NAMES = {
    WC_SUCCESS: "success",
    WC_LOC_LEN_ERR: "local length error",
    WC_LOC_QP_OP_ERR: "local QP operation error",
    WC_LOC_PROT_ERR: "local protection error",
    WC_WR_FLUSH_ERR: "work request flushed",
    WC_LOC_ACCESS_ERR: "local access error",
    WC_REM_INV_REQ_ERR: "remote invalid request",
    WC_REM_ACCESS_ERR: "remote access error",
    WC_REM_OP_ERR: "remote operation error",
    WC_RETRY_EXC_ERR: "transport retry counter exceeded",
    WC_RNR_RETRY_EXC_ERR: "RNR retry counter exceeded",
    WC_FATAL_ERR: "fatal error",
    WC_GENERAL_ERR: "general error",
}

_ERROR_CLASSES = {
    WC_LOC_PROT_ERR: errors.LocalProtectionError,
    WC_LOC_LEN_ERR: errors.LocalProtectionError,
    WC_REM_ACCESS_ERR: errors.RemoteAccessError,
    WC_REM_INV_REQ_ERR: errors.RemoteInvalidRequestError,
    WC_REM_OP_ERR: errors.RemoteOperationError,
    WC_WR_FLUSH_ERR: errors.FlushedError,
}


def completion_error(status: int, batch_id: int = 0, index: int = 0, detail: str = "") -> errors.CompletionError:
    """The typed exception for an error completion."""
    name = WC_STATUS_NAMES.get(status, f"status {status}")
    msg = f"batch {batch_id} op {index}: {name}" + (f" ({detail})" if detail else "")
    cls = _ERROR_CLASSES.get(status, errors.CompletionError)
    return cls(msg, status=status, batch_id=batch_id, index=index)


def new_ops(n: int) -> np.ndarray:
    """A zeroed array of ``n`` operations (preallocate once, refill per batch)."""
    return np.zeros(n, dtype=OP_DTYPE)


def new_completions(n: int) -> np.ndarray:
    return np.zeros(n, dtype=COMPLETION_DTYPE)


@dataclass(frozen=True)
class RemoteRegion:
    """What a provider hands a requester for one registered region."""

    addr: int
    length: int
    rkey: int


class Endpoint(abc.ABC):
    """The requester's half of a connection to one provider."""

    #: transport name ("tcp", "loopback", "verbs")
    name: str = ""
    #: operations one batch may hold
    max_batch: int = 1024
    #: batches that may be outstanding (posted, not yet polled)
    max_outstanding: int = 16
    #: a get posts its READs to this endpoint in batches of about this many bytes, so that the
    #: first land (and are opened or copied) while the rest are on their way; 0: one batch
    read_chunk: int = 0
    #: set by whoever ran the connect exchange: ``params -> reply`` through the control
    #: connection, so that ``recover()`` can build a new connection (verbs needs a new QP)
    reconnect_params = None

    @abc.abstractmethod
    def local_params(self) -> dict:
        """JSON-serialisable parameters the provider needs to accept this endpoint."""

    @abc.abstractmethod
    def connect(self, remote_params: dict) -> None:
        """Complete the connection with what the provider's ``accept`` returned."""

    @abc.abstractmethod
    def register_local(self, addr: int, length: int) -> int:
        """Register a local buffer for use as the local side of operations; returns its lkey."""

    @abc.abstractmethod
    def deregister_local(self, lkey: int) -> None: ...

    @abc.abstractmethod
    def post(self, ops: np.ndarray, batch_id: int) -> None:
        """Post ``ops`` (1-D ``OP_DTYPE``, 1..max_batch long) as one batch.

        Raises ``TransportError`` when ``max_outstanding`` batches are already in flight,
        ``ConnectionLost`` when the endpoint is broken (call ``recover()``).
        """

    @abc.abstractmethod
    def poll(self, out: np.ndarray, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (None: forever, 0: don't wait) for completions.

        Fills ``out[:n]`` (``COMPLETION_DTYPE``) and returns n; 0 means the timeout passed.
        """

    @property
    @abc.abstractmethod
    def outstanding(self) -> int:
        """Batches posted and not yet returned by ``poll``."""

    def c_core(self):
        """The object compiled code posts and polls on without the GIL (the page store's C
        request path, ext/_reqpath.pyx, reads remote pages through it), or None: this transport
        has none, and those reads take the Python path.  Valid until the endpoint breaks.

        Compiled code drives it through a table of C functions (ext/linkcore.pxd: idle, post,
        poll, detail, abandon).  tcp's core is its WireRequester (READ data lands only inside its
        own poll, so a READ C gives up on can never land later).  verbs' is its QP
        (``c_interface()`` hands out the table): a READ C gave up on at the timeout could still
        be DMA'd into staging, which C reuses at once for reads on other links, so C abandons it
        first: the QP goes to the error state (the device drops late responses) and C waits for
        the batch's flush; if that does not come, C stops reading remote pages until Python has
        suspended the link (deregistering staging from it) and bound the routes again.  Both
        have ``spin_counters()``: how their completion waits polled (ext/spin.pxd)."""
        return None

    def c_failure(self, code: int, detail: int) -> str:
        """Why C's post or poll on ``c_core()`` failed with result ``code`` (< 0), in words; the
        endpoint is then unusable until ``recover()``, as after a failed ``post`` or ``poll``."""
        return f"data path failed with code {code} ({detail})"

    @abc.abstractmethod
    def recover(self) -> None:
        """Make a broken endpoint usable again (verbs: QP reset and reconnect)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Idempotent; outstanding batches are dropped."""

    # -- conveniences built on the primitives -------------------------------------------------

    def execute(self, ops: np.ndarray, batch_id: int = 0, timeout: float | None = 30.0) -> None:
        """Post one batch and wait for it; raise the typed error if it failed.

        Completions of other batches that arrive meanwhile are an error here: callers
        that pipeline use ``post``/``poll`` directly.
        """
        self.post(ops, batch_id)
        out = np.zeros(1, dtype=COMPLETION_DTYPE)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.poll(out, left):
                c = out[0]
                if int(c["batch_id"]) != batch_id:
                    raise errors.TransportError(
                        f"completion for batch {int(c['batch_id'])} while waiting for {batch_id}"
                    )
                if c["status"] != WC_SUCCESS:
                    raise completion_error(int(c["status"]), batch_id, int(c["index"]))
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.TransportError(f"batch {batch_id} timed out after {timeout}s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ProviderSession(abc.ABC):
    """The provider's half for one requester: its regions and its data connections.

    Keys registered in one session are invisible to every other session.
    """

    @abc.abstractmethod
    def register(self, addr: int, length: int) -> int:
        """Expose (addr, length) for remote READ/WRITE; returns the rkey."""

    @abc.abstractmethod
    def deregister(self, rkey: int) -> None:
        """After this returns, no operation can reach the region."""

    @abc.abstractmethod
    def accept(self, peer_params: dict) -> dict:
        """Accept an endpoint described by ``Endpoint.local_params()``; returns its ``connect`` params."""

    @abc.abstractmethod
    def close(self) -> None:
        """Idempotent: deregisters every region and drops every connection of the session."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RegionTableSession(ProviderSession):
    """A session whose regions live in an ``rram._ext._regions.RegionTable`` (tcp, loopback).

    Subclasses set ``table``, ``session_id`` and ``closed``.
    """

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


class RegionTableEndpoint(Endpoint):
    """An endpoint whose local regions live in an ``rram._ext._regions.RegionTable`` ``_local``."""

    def register_local(self, addr: int, length: int) -> int:
        try:
            return self._local.register(addr, length)
        except (ValueError, OverflowError) as exc:
            raise errors.TransportError(f"cannot register local buffer: {exc}") from exc

    def deregister_local(self, lkey: int) -> None:
        if not self._local.deregister(lkey):
            raise errors.NotFound(f"lkey {lkey:#x} is not registered on this endpoint")


class ProviderTransport(abc.ABC):
    """Runs inside the provider process; owns listeners or the RDMA device."""

    name: str = ""

    @abc.abstractmethod
    def open_session(self, session_id: str, secret: bytes | None = None) -> ProviderSession:
        """A session for one requester.  ``secret``: bytes both ends derived from the control
        handshake and never sent; a transport whose connections the requester dials (tcp) makes
        each one prove it.  The requester side finds it as ``session_secret`` (hex) in the
        parameters its control client hands to ``Endpoint.connect``.  None (in-process tools and
        tests): the transport makes one up and returns it in ``accept``'s parameters."""

    def _add_session(self, session_id: str, make) -> ProviderSession:
        """The body of most ``open_session``s: unique ids, refused once closed.

        Uses the implementation's ``_lock``, ``_sessions`` (dict) and ``_closed``.
        """
        with self._lock:
            if self._closed:
                raise errors.TransportError(f"the {self.name} transport is closed")
            if session_id in self._sessions:
                raise errors.TransportError(f"session {session_id!r} is already open")
            session = self._sessions[session_id] = make()
        return session

    def _drop(self, session: ProviderSession) -> None:
        """Forget a closed ``session``, unless a newer one has taken its id meanwhile."""
        with self._lock:
            if self._sessions.get(session.session_id) is session:
                del self._sessions[session.session_id]

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RequesterTransport(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def endpoint(self) -> Endpoint: ...

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
