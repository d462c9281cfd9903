"""Mutual HMAC-SHA256 challenge/response over the control connection.

    requester -> provider   hello {requester: name, nonce: client_nonce}
    provider  -> requester  {challenge: server_nonce}
    requester -> provider   auth {mac: HMAC(secret, "rram-requester" | server_nonce | client_nonce | name)}
    provider  -> requester  welcome {..., proof: HMAC(secret, "rram-provider" | client_nonce | server_nonce | name)}

Both nonces are fresh random bytes, so no answer can be replayed; the role labels keep one
side's MAC from being reflected as the other's.  The provider proves itself only after the
requester has, and the secret itself never crosses the wire.  Comparisons are constant-time.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from ..errors import AuthError, ProtocolError

NONCE_SIZE = 32
_REQUESTER = b"rram-requester\0"
_PROVIDER = b"rram-provider\0"


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
        raise AuthError("the cluster secret is empty")
    msg = label + _nonce(first, "nonce") + _nonce(second, "nonce") + name.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def requester_mac(secret: bytes, server_nonce: str, client_nonce: str, name: str) -> str:
    """What the requester sends to prove it knows ``secret``."""
    return _mac(secret, _REQUESTER, server_nonce, client_nonce, name)


def provider_proof(secret: bytes, server_nonce: str, client_nonce: str, name: str) -> str:
    """What the provider sends back to prove it knows ``secret`` too."""
    return _mac(secret, _PROVIDER, client_nonce, server_nonce, name)


def verify(expected: str, got) -> bool:
    """Constant-time comparison of two hex MACs (False for anything that is not a string)."""
    if not isinstance(got, str):
        return False
    return hmac.compare_digest(expected.encode(), got.encode("utf-8", "replace"))


def check_nonce(text: str, what: str = "nonce") -> None:
    """ProtocolError unless ``text`` is a well-formed nonce."""
    _nonce(text, what)
