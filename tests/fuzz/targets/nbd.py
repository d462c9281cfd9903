"""Fuzz target: the NBD server's handshake and requests (rram/frontends/nbd/protocol.py) and
the C request parser it hands plain READ/WRITE runs to (ext/_nbdwire.pyx, RequestRun).

The bytes are a client's stream from its flags on, fed in pieces to a ServerConnection the way
the server does (recv into get_buffer, next_event, take_run once in transmission), for an
export without and with a block size, and for one that requires TLS (FORCEDTLS: a StartTLS
event is answered with ``tls_started()``, as the server does once its handshake succeeds).  Oracle: only NBDError (a ProtocolError) escapes; every
Request and every request the C run takes is inside the export, aligned and within max_block;
replies go out for every event.
"""
from __future__ import annotations

from tests.fuzz import driver

with driver.instrumented():
    from rram.frontends.nbd import protocol as P
from rram._ext._nbdwire import RequestRun

SIZE = 1 << 20
EXPORTS = ((P.Export(name="rram", size=SIZE, max_block=64 << 10), False),
           (P.Export(name="", size=SIZE - 4096, min_block=4096, max_block=32 << 10), False),
           (P.Export(name="rram", size=SIZE), True))


def _check(e: P.Export, cmd: int, offset: int, length: int) -> None:
    assert offset + length <= e.size and offset % e.min_block == 0 and length % e.min_block == 0, (cmd, offset, length)
    assert length <= e.max_block or cmd not in (P.NBD_CMD_READ, P.NBD_CMD_WRITE), (cmd, length)


def _serve(e: P.Export, tls: bool, data: bytes, step: int) -> None:
    conn = P.ServerConnection(e, tls=tls, initial_buffer=64)
    conn.data_to_send()
    run = None
    pos = 0
    while True:
        if run is not None and conn.take_run(run):
            for k in range(run.nreq):
                cmd, flags, handle, offset, length, payload = run.request(k)
                _check(e, cmd, offset, length)
                assert flags & ~P.NBD_CMD_FLAG_FUA == 0 and length % 4096 == 0 and offset % 4096 == 0
                assert payload is None or len(payload) == length
            assert all(p < e.size // 4096 for p in run.pages[: run.npages])
            if run.command == P.NBD_CMD_READ:
                run.read_replies()
            else:
                run.write_replies()
            run.clear()
        ev = conn.next_event()
        if ev is P.NEED_DATA:
            if pos >= len(data):
                return
            room = conn.get_buffer()
            # before TLS a client waits for STARTTLS's reply: bytes after it in one recv are an
            # error, so the first bytes on a TLS-only export come one at a time
            n = min(len(room), 1 if tls and not conn.tls_active and pos < 256 else step, len(data) - pos)
            room[:n] = data[pos : pos + n]
            conn.buffer_updated(n)
            pos += n
        elif isinstance(ev, P.Ready):
            assert conn.tls_active or not tls, "transmission without TLS on a TLS-only export"
            run = RequestRun(16, ev.structured_replies)
        elif isinstance(ev, P.StartTLS):
            assert tls and not conn.tls_active
            conn.tls_started()
        elif isinstance(ev, P.Request):
            _check(e, ev.command, ev.offset, ev.length)
            if ev.command == P.NBD_CMD_READ:
                buf = bytearray(conn.read_header_size)
                conn.pack_read_header(buf, ev)
            else:
                assert (ev.data is not None) == (ev.command == P.NBD_CMD_WRITE)
                conn.reply(ev, P.NBD_EIO if ev.handle & 1 else 0, "fuzz")
        else:
            assert isinstance(ev, P.Closed), ev
            return
        conn.data_to_send()


def one_input(data: bytes) -> None:
    step = 4096 >> (data[-1] % 13) if data else 1  # the last byte picks recv sizes of 1..4096 bytes
    for e, tls in EXPORTS:
        try:
            _serve(e, tls, data, step)
        except P.NBDError:
            pass


driver.main(__name__, one_input)
