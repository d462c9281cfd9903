"""Fuzz target: control frames (rram/control/messages.py), read as a provider, a requester and a tool.

The same bytes go to a Decoder of each role, whole and in two pieces; every message that comes
out must be a dict that passed its role's check, and a successful reply is checked against
every request type's reply schema.  A hello and an auth request also go through the checks
the provider's handshake makes of their fields (rram/provider/connection.py: nonce, identity,
key derivation, MAC), and a connect request's parameters go through the verbs transport's
parser (rram/transport/verbs.py; tcp takes none).  Only ProtocolError (and AuthError from the handshake) may escape.
"""
from __future__ import annotations

from tests.fuzz import driver

with driver.instrumented():
    from rram.control import auth
    from rram.control import messages as M
    from rram.transport import verbs
from rram.errors import AuthError, ProtocolError

MASTER = bytes(32)
SERVER_NONCE = "ab" * auth.NONCE_SIZE


def _handshake_fields(msg: dict) -> None:
    """What ControlConnection._handshake does with a hello's and an auth's fields."""
    if msg["type"] == "hello":
        auth.check_nonce(msg["nonce"], "hello nonce")
        auth.check_identity(msg["requester"], msg["role"], msg["generation"])
        key = auth.derive(MASTER, msg["requester"], msg["role"], msg["generation"]).key
        auth.requester_mac(key, SERVER_NONCE, msg["nonce"], msg["requester"])
        auth.provider_proof(key, SERVER_NONCE, msg["nonce"], msg["requester"])
        auth.session_secret(key, SERVER_NONCE, msg["nonce"])
    elif msg["type"] == "connect":
        verbs._parse_params(msg["params"])
    elif msg["type"] == "auth":
        assert auth.verify("00" * 32, msg["mac"]) is False or msg["mac"] == "00" * 32


def _decode(role: str, max_frame: int, pieces) -> list[dict]:
    dec = M.Decoder(role, max_frame=max_frame)
    out = []
    try:
        for p in pieces:
            out += dec.feed(p)
    except ProtocolError:
        pass
    assert dec.buffered <= max_frame + M.LENGTH.size, "decoder holds more than one frame"
    return out


def one_input(data: bytes) -> None:
    half = len(data) // 2
    for role, limit in (("request", M.MAX_HANDSHAKE_FRAME), ("request", M.MAX_REQUEST_FRAME),
                        ("reply", M.MAX_FRAME), ("any", M.MAX_FRAME)):
        for msg in _decode(role, limit, (data[:half], data[half:])):
            assert isinstance(msg, dict)
            if role == "request":
                assert msg["type"] in M.REQUESTS and M.check_request(msg) is msg
                try:
                    _handshake_fields(msg)
                except (ProtocolError, AuthError):
                    pass
            elif role == "reply" and msg["ok"]:
                for kind in M.REPLIES:
                    try:
                        M.check_reply(kind, msg)
                    except ProtocolError:
                        pass
            try:
                M.encode(msg)  # what was decoded can be sent on (a provider echoes fields)
            except ProtocolError:
                pass  # e.g. a message longer than MAX_FRAME once re-encoded


driver.main(__name__, one_input)
