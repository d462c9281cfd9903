"""NBD_OPT_STARTTLS in the sans-IO parser: the spec's FORCEDTLS mode, byte by byte."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram import errors
from rram.frontends.nbd import protocol as P

from .test_nbd_protocol import Peer, go_data, opt


def test_everything_but_starttls_and_abort_is_refused_before_tls():
    p = Peer(tls=True)
    for option, data in ((P.NBD_OPT_GO, go_data()), (P.NBD_OPT_INFO, go_data()), (P.NBD_OPT_LIST, b""),
                         (P.NBD_OPT_STRUCTURED_REPLY, b""), (99, b"")):
        assert p.send(opt(option, data)) == []
        ((got, kind, message),) = p.option_replies()
        assert (got, kind) == (option, P.NBD_REP_ERR_TLS_REQD) and b"requires TLS" in message
    assert not p.conn.structured and not p.conn.in_transmission
    assert isinstance(p.send(opt(P.NBD_OPT_ABORT))[0], P.Closed)


def test_export_name_before_tls_ends_the_connection():
    p = Peer(tls=True)
    with pytest.raises(P.StreamError, match="before NBD_OPT_STARTTLS"):
        p.send(opt(P.NBD_OPT_EXPORT_NAME, b"rram"))


def test_starttls_then_haggling_goes_on_inside_tls():
    p = Peer(tls=True)
    assert p.send(opt(P.NBD_OPT_STARTTLS, b"x")) == []  # STARTTLS takes no data
    assert p.option_replies()[0][1] == P.NBD_REP_ERR_INVALID
    p.conn.receive_data(opt(P.NBD_OPT_STARTTLS))  # by hand: the caller stops at StartTLS
    assert isinstance(p.conn.next_event(), P.StartTLS)
    p.out += p.conn.data_to_send()
    assert p.option_replies() == [(P.NBD_OPT_STARTTLS, P.NBD_REP_ACK, b"")]
    with pytest.raises(P.StreamError, match="tls_started"):
        p.conn.next_event()  # the caller must run the handshake first
    p.conn.tls_started()
    p.send(opt(P.NBD_OPT_STARTTLS))
    assert p.option_replies()[0][1] == P.NBD_REP_ERR_INVALID  # TLS twice
    p.send(opt(P.NBD_OPT_STRUCTURED_REPLY))
    (ready,) = p.send(opt(P.NBD_OPT_GO, go_data("rram")))
    assert isinstance(ready, P.Ready) and ready.structured_replies


def test_plaintext_behind_starttls_is_not_let_through():
    p = Peer(tls=True)
    with pytest.raises(P.StreamError, match="plaintext bytes sent after NBD_OPT_STARTTLS"):
        p.send(opt(P.NBD_OPT_STARTTLS) + opt(P.NBD_OPT_GO, go_data()))


def test_a_plaintext_server_still_declines_starttls():
    p = Peer()
    p.send(opt(P.NBD_OPT_STARTTLS))
    assert p.option_replies()[0][1] == P.NBD_REP_ERR_POLICY
    with pytest.raises(errors.ProtocolError):
        p.conn.tls_started()


_options = st.builds(opt, st.sampled_from([P.NBD_OPT_STARTTLS, P.NBD_OPT_GO, P.NBD_OPT_EXPORT_NAME, P.NBD_OPT_LIST,
                                           P.NBD_OPT_STRUCTURED_REPLY, P.NBD_OPT_ABORT, 42]),
                     st.sampled_from([b"", go_data("rram"), b"x" * 7]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_options, max_size=10), st.integers(1, 41), st.booleans())
def test_fuzz_no_transmission_without_tls(options, step, handshake_ok):
    """Whatever options arrive in whatever pieces, a TLS-only connection reaches transmission
    only through StartTLS and tls_started(), and fails only with StreamError."""
    conn = P.ServerConnection(P.Export(name="rram", size=1 << 20), tls=True)
    stream = struct.pack(">I", 3) + b"".join(options)
    try:
        for i in range(0, len(stream), step):
            conn.receive_data(stream[i:i + step])
            while True:
                ev = conn.next_event()
                conn.data_to_send()
                if isinstance(ev, P.StartTLS):
                    if not handshake_ok:
                        return  # the server hangs up when the handshake fails
                    conn.tls_started()
                    continue
                if isinstance(ev, P.Ready):
                    assert conn.tls_active
                if ev is P.NEED_DATA or isinstance(ev, (P.Closed, P.Ready)):
                    break
            if isinstance(ev, (P.Closed, P.Ready)):
                break
    except P.StreamError:
        pass
