"""Mutual HMAC challenge/response: both sides must know the secret, nothing replays."""
from __future__ import annotations

import pytest

from rram.control import auth
from rram.errors import AuthError, ProtocolError


def test_both_directions_verify_with_the_same_secret():
    sn, cn = auth.new_nonce(), auth.new_nonce()
    mac = auth.requester_mac(b"k", sn, cn, "req")
    assert auth.verify(auth.requester_mac(b"k", sn, cn, "req"), mac)
    assert not auth.verify(auth.requester_mac(b"other", sn, cn, "req"), mac)
    proof = auth.provider_proof(b"k", sn, cn, "req")
    assert auth.verify(auth.provider_proof(b"k", sn, cn, "req"), proof)
    assert proof != mac  # role labels: one side's answer is never valid for the other


def test_bound_to_nonces_and_name():
    sn, cn = auth.new_nonce(), auth.new_nonce()
    mac = auth.requester_mac(b"k", sn, cn, "req")
    assert mac != auth.requester_mac(b"k", auth.new_nonce(), cn, "req")
    assert mac != auth.requester_mac(b"k", sn, auth.new_nonce(), "req")
    assert mac != auth.requester_mac(b"k", sn, cn, "req2")


def test_nonces_are_fresh_and_sized():
    nonces = {auth.new_nonce() for _ in range(100)}
    assert len(nonces) == 100 and all(len(bytes.fromhex(n)) == auth.NONCE_SIZE for n in nonces)


def test_bad_inputs():
    with pytest.raises(ProtocolError, match="must be hex"):
        auth.check_nonce("zz")
    with pytest.raises(ProtocolError, match="must be 32 bytes"):
        auth.check_nonce("00")
    with pytest.raises(AuthError, match="empty"):
        auth.requester_mac(b"", auth.new_nonce(), auth.new_nonce(), "r")
    assert not auth.verify("ab", None)
    assert not auth.verify("ab", "\udcff")
