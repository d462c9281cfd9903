"""Identities, roles and the mutual HMAC-SHA256 challenge/response of the control connection.

Every requester and operator has its own key, derived from the cluster's master key::

    key(name, role, generation) = HMAC(master, "rram-identity" | name | role | generation)

``rram keys add NAME --role ROLE`` writes it to a key file that only that identity gets; the
providers hold the master key and derive any identity's key when it connects, so a newcomer
needs no change on the providers.  A key proves its name, role and generation together:
names are proven, not asserted, and one identity's key says nothing about another's (HMAC is
one-way).  Revoking ``name`` up to a generation (the cluster file's ``revoked``) makes those
keys useless; ``rram keys add`` then issues the next generation.

    requester -> provider   hello {requester: name, role, generation, nonce: client_nonce}
    provider  -> requester  {challenge: server_nonce}
    requester -> provider   auth {mac: HMAC(key, "rram-requester" | server_nonce | client_nonce | name)}
    provider  -> requester  welcome {..., proof: HMAC(key, "rram-provider" | client_nonce | server_nonce | name)}

Both nonces are fresh random bytes, so no answer can be replayed; the role labels keep one
side's MAC from being reflected as the other's.  The provider proves itself only after the
requester has (with the same identity key: only a holder of the master or of that key can),
and no key crosses the wire.  Comparisons are constant-time.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from ..errors import AuthError, ProtocolError

NONCE_SIZE = 32
KEY_SIZE = 32
_REQUESTER = b"rram-requester\0"
_PROVIDER = b"rram-provider\0"
_IDENTITY = b"rram-identity\0"

#: what each role may ask a provider (hello and auth come before any role is known)
ROLES = {
    "requester": frozenset({"alloc_slab", "free_slab", "connect", "stats", "heartbeat", "resume", "report", "bye"}),
    "operator": frozenset({"stats", "heartbeat", "drain", "undrain", "shutdown", "reload", "reclaim", "bye"}),
    "provider": frozenset({"stats", "heartbeat", "bye"}),
}
#: longest identity name (it travels in hello frames before authentication)
MAX_NAME = 200


@dataclass(frozen=True)
class Credential:
    """One identity's key; ``repr`` never shows the key."""

    name: str
    role: str
    generation: int
    key: bytes

    def __repr__(self) -> str:
        return f"Credential({self.name!r}, role={self.role!r}, generation={self.generation})"


def check_identity(name, role, generation) -> None:
    """ProtocolError unless (name, role, generation) is well-formed."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise ProtocolError(f"an identity name must be 1..{MAX_NAME} characters")
    if not _encodable(name):  # JSON lets a lone "\ud800" through; keys are derived from name.encode()
        raise ProtocolError(f"an identity name must be valid UTF-8 text, got {name!r:.40}")
    if role not in ROLES:
        raise ProtocolError(f"role must be one of {', '.join(ROLES)}, got {role!r:.40}")
    if isinstance(generation, bool) or not isinstance(generation, int) or not 1 <= generation < 2**31:
        raise ProtocolError(f"generation must be an integer >= 1, got {generation!r:.40}")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def derive(master: bytes, name: str, role: str, generation: int = 1) -> Credential:
    """The credential of ``name`` in ``role``: only holders of ``master`` can make one."""
    if not master:
        raise AuthError("the cluster's master key is empty")
    check_identity(name, role, generation)
    msg = _IDENTITY + name.encode() + b"\0" + role.encode() + b"\0" + str(generation).encode()
    return Credential(name, role, generation, hmac.new(master, msg, hashlib.sha256).digest())


def session_secret(key: bytes, server_nonce: str, client_nonce: str) -> bytes:
    """What both ends of one authenticated handshake can compute and nobody else: the secret
    that data connections of the session prove (tcp: wire.hello_mac).  Never sent."""
    msg = b"rram-session\0" + _nonce(server_nonce, "nonce") + _nonce(client_nonce, "nonce")
    return hmac.new(key, msg, hashlib.sha256).digest()


def new_master_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def new_nonce() -> str:
    """A fresh nonce, hex-encoded for the JSON frames."""
    return secrets.token_bytes(NONCE_SIZE).hex()


def _nonce(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{what} must be hex, got {text!r:.40}") from exc
    if len(raw) != NONCE_SIZE:
        raise ProtocolError(f"{what} must be {NONCE_SIZE} bytes, got {len(raw)}")
    return raw


def _mac(secret: bytes, label: bytes, first: str, second: str, name: str) -> str:
    if not secret:
        raise AuthError("the key is empty")
    msg = label + _nonce(first, "nonce") + _nonce(second, "nonce") + name.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def requester_mac(secret: bytes, server_nonce: str, client_nonce: str, name: str) -> str:
    """What the requester sends to prove it holds ``secret`` (its identity key)."""
    return _mac(secret, _REQUESTER, server_nonce, client_nonce, name)


def provider_proof(secret: bytes, server_nonce: str, client_nonce: str, name: str) -> str:
    """What the provider sends back to prove it knows the identity key too."""
    return _mac(secret, _PROVIDER, client_nonce, server_nonce, name)


def verify(expected: str, got) -> bool:
    """Constant-time comparison of two hex MACs (False for anything that is not a string)."""
    if not isinstance(got, str):
        return False
    return hmac.compare_digest(expected.encode(), got.encode("utf-8", "replace"))


def check_nonce(text: str, what: str = "nonce") -> None:
    """ProtocolError unless ``text`` is a well-formed nonce."""
    _nonce(text, what)
