"""NBD_OPT_STARTTLS in the sans-IO parser: the spec's FORCEDTLS mode, byte by byte."""
from __future__ import annotations

import pytest

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
