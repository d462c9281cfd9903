"""One error hierarchy for rram.

Each layer translates the errors of the layer below into these (``raise X from exc``),
keeping the errno or work-completion status so that callers can branch on it.
"""
from __future__ import annotations

import errno as _errno


class RramError(Exception):
    """Base of every error rram raises on purpose."""


class ConfigError(RramError):
    """The cluster file or a setting is wrong; the message names the file, key and expectation."""


class ProtocolError(RramError):
    """A peer sent bytes that do not follow the protocol (control, data or NBD frames)."""


class AuthError(RramError):
    """A key did not verify (HMAC challenge failed), or was revoked: the connection is closed."""


class Forbidden(AuthError):
    """The caller's role may not make this request; the connection stays usable."""


class TransportError(RramError):
    """The data path failed; ``errno`` is set when the OS or the verbs library gave one."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class ReplicaSuspended(TransportError):
    """Some pages' only live copies are on suspended providers: retry once one resumes or is
    declared dead (PageStore waits up to RemoteTier.suspension_wait before giving up)."""


class TransportUnavailable(TransportError):
    """A transport cannot run on this host (no device, no library); the message says why."""


class ConnectionLost(TransportError):
    """The peer went away; the endpoint must be reconnected before it is used again."""


class CompletionError(TransportError):
    """A one-sided operation completed with an error status.

    ``status`` uses libibverbs' ``enum ibv_wc_status`` numbering in every transport, so
    code above the transport branches the same way over TCP, in-process and verbs.
    ``index`` is the position of the failing operation inside its batch.
    """

    def __init__(self, message: str, status: int, batch_id: int = 0, index: int = 0):
        super().__init__(message)
        self.status = status
        self.batch_id = batch_id
        self.index = index


class LocalProtectionError(CompletionError):
    """The local buffer of an operation is outside the local region it names (IBV_WC_LOC_PROT_ERR)."""


class RemoteAccessError(CompletionError):
    """Bad remote key or out-of-bounds remote address (IBV_WC_REM_ACCESS_ERR)."""


class RemoteInvalidRequestError(CompletionError):
    """The provider rejected a malformed operation (IBV_WC_REM_INV_REQ_ERR)."""


class RemoteOperationError(CompletionError):
    """The provider could not carry out the operation (IBV_WC_REM_OP_ERR)."""


class FlushedError(CompletionError):
    """The operation was not executed because an earlier one failed (IBV_WC_WR_FLUSH_ERR)."""


class StoreFullError(RramError):
    """Neither the local pool nor any provider has room for a persistent page."""


class ReplicationError(StoreFullError):
    """Fewer live copies than ``min_replicas``: a persistent write is refused rather than kept
    with too few copies (Ceph's ``min_size``)."""


class CapacityError(RramError):
    """A provider cannot lease more memory without exceeding its configured capacity."""


class NotFound(RramError):
    """A named object (slab lease, node, pool) does not exist."""


def os_error(message: str, err: int) -> TransportError:
    """A TransportError for a C call that failed with ``err`` (an errno value)."""
    return TransportError(f"{message}: {_errno.errorcode.get(err, err)} ({err})", errno=err)


class CorruptDataError(RramError):
    """Stored bytes did not decompress to a whole page (bit rot, a bug, or the wrong slot)."""


class SealError(CorruptDataError):
    """A sealed page did not verify on any copy: a provider altered, swapped or replayed it (or the
    bytes rotted).  The read fails rather than return wrong bytes; ``errno`` is EIO."""

    errno = _errno.EIO
