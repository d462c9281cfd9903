"""Regressions for what fuzzing found (tests/fuzz): each input once raised something other than
the project's typed error, or was taken where the protocol says it must be refused."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from rram import config, errors, transport
from rram.control import auth
from rram.control import messages as M
from rram.transport import new_completions, new_ops, wire
from rram.transport.base import OP_READ, WC_SUCCESS

from .test_tcp_bad_frames import assert_good_client_works, expect_error, hello_done, one_op, provider  # noqa: F401

tcp_only = pytest.mark.skipif(transport.unavailable_reason("tcp") is not None,
                              reason=str(transport.unavailable_reason("tcp")))


# -- cluster file ---------------------------------------------------------------------------------


def test_a_cluster_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_bytes(b"\x0e\xd9")  # was UnicodeDecodeError from the text stream
    with pytest.raises(errors.ConfigError, match=r"cluster.yaml: not UTF-8 text \(unexpected end of data\)"):
        config.load(path)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1" + "0" * 400])
def test_seconds_must_be_finite(tmp_path, value):
    # .nan passed "positive" (nan <= 0 is false) and a lease never expired; a 400-digit
    # integer raised OverflowError in float()
    path = tmp_path / "cluster.yaml"
    path.write_text(f"secret: s\nlease_grace: {value}\nnodes: []\n")
    with pytest.raises(errors.ConfigError, match="lease_grace: expected a finite number of seconds"):
        config.load(path)


@pytest.mark.parametrize("text,words", [
    ("!!float", "IndexError"), ("!!int 0x", "ValueError"), ("!!bool", "KeyError"),
    ("nodes: !!timestamp 2020-99-99", "ValueError"), ("name: !!timestamp 200112-", "AttributeError"),
    ("[" * 3000, "nested too deeply"),
])
def test_a_malformed_tagged_value_or_deep_nesting_is_a_config_error(tmp_path, text, words):
    # PyYAML's constructors raise these, not a YAMLError; deep nesting hits the recursion limit
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(errors.ConfigError, match=f"cluster.yaml: not valid YAML.*{words}"):
        config.load(path)


# -- control frames -------------------------------------------------------------------------------


def test_a_hello_with_a_lone_surrogate_in_the_name_is_a_protocol_error():
    # JSON "\ud800" decodes to a str that cannot be encoded: the provider's key derivation
    # raised UnicodeEncodeError ("internal error", a stack trace per connection, before auth)
    body = json.dumps({"v": 1, "type": "hello", "id": 1, "requester": "a\ud800", "role": "requester",
                       "generation": 1, "nonce": "cd" * auth.NONCE_SIZE}).encode()
    (hello,) = M.Decoder("request").feed(M.LENGTH.pack(len(body)) + body)
    with pytest.raises(errors.ProtocolError, match="valid UTF-8"):
        auth.check_identity(hello["requester"], hello["role"], hello["generation"])


@pytest.mark.parametrize("params", [
    {"qpn": "1e999"},   # int(inf): OverflowError
    {"replaces": [1]},  # an unhashable qpn to replace: TypeError in the provider's set of QPs
    {"replaces": "7"},
])
def test_bad_verbs_connect_parameters_are_a_protocol_error(params):
    from rram.transport import verbs

    good = {"transport": "verbs", "qpn": 17, "psn": 5, "mtu": 3, "gid": "00" * 16}
    body = json.dumps({"v": 1, "type": "connect", "id": 1, "params": {**good, **params}}).encode()
    body = body.replace(b'"1e999"', b"1e999")  # a JSON number that overflows to inf
    (msg,) = M.Decoder("request").feed(M.LENGTH.pack(len(body)) + body)
    with pytest.raises(errors.ProtocolError, match="bad verbs connection parameters"):
        verbs._parse_params(msg["params"])


# -- tcp data frames --------------------------------------------------------------------------------


@tcp_only
def test_a_request_with_unknown_flags_is_refused_like_the_reference_decoder(provider):  # noqa: F811
    pt, session, region, rkey = provider
    sock, key = hello_done(session)
    head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.REQUEST, wire.FLAG_MAC | 2, 1, 1, 0, 0, 0)
    descs = one_op(region, rkey).tobytes()
    sock.sendall(head + descs + wire.request_mac(key, head + descs))  # signed: only the flags are wrong
    expect_error(sock, wire.E_BAD_FRAME, "REQUEST frame with unknown flags 0x3")
    assert_good_client_works(session, region, rkey)


@tcp_only
def test_a_successful_completion_must_name_every_sent_op():
    from rram.transport import tcp

    ep = tcp.TcpEndpoint(spin_us=0)
    ours, peer = socket.socketpair()
    buf = np.zeros(4096, np.uint8)
    try:
        ours.setblocking(False)
        ep._core.attach(ours.fileno())  # as TcpEndpoint._dial does after the handshake
        ep._sock, ep._broken = ours, None
        ops = new_ops(1)
        ops[0] = (buf.ctypes.data, 1 << 40, 64, ep.register_local(buf.ctypes.data, buf.size), 1, OP_READ, (0, 0, 0))
        ep.post(ops, 7)
        peer.sendall(wire.completion(7, WC_SUCCESS, 259, bytes(64)))  # was taken, index 259 of 1 op
        with pytest.raises(errors.ConnectionLost, match="completion for batch 7 names op 259 of 1"):
            ep.poll(new_completions(1), 5.0)
    finally:
        ep.close()
        peer.close()


# -- far-memory channel -----------------------------------------------------------------------------


@pytest.mark.parametrize("msg,pages", [
    ({"offset": 4096, "length": 8192}, (1, 3)),
    ({"offset": -8192, "length": 4097}, (0, 0)),     # clipped, as before
    ({"offset": 1 << 70, "length": 1}, (16, 16)),    # beyond the region: nothing
])
def test_prefetch_range_clips_to_the_region(msg, pages):
    from rram.frontends.farmem import wire as W

    assert W.prefetch_range(msg, 16, 4096) == pages


@pytest.mark.parametrize("msg", [{}, {"offset": "0", "length": 1}, {"offset": 0, "length": 1.5},
                                 {"offset": True, "length": 1}])
def test_a_bad_prefetch_request_is_a_protocol_error(msg):
    # int(msg["offset"]) raised KeyError/ValueError in the handler, which failed the whole region
    from rram.frontends.farmem import wire as W

    with pytest.raises(errors.ProtocolError, match="prefetch (offset|length) must be an integer"):
        W.prefetch_range(msg, 16, 4096)
