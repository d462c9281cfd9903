"""The sans-IO NBD server protocol, byte by byte, and the backends (memory, page store)."""
from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rram import errors
from rram.frontends.nbd import protocol as P
from rram.frontends.nbd.backend import PageStoreBackend
from rram.testing.inproc import InProcessProvider, export_backend, make_store

SIZE = 1 << 20
OPT_HDR = struct.Struct(">QIII")


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def go_data(name: str = "", infos=()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7, data: bytes = b"") -> bytes:
    return P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


class Peer:
    """Drives a ServerConnection like a client would and decodes what it sends back."""

    def __init__(self, export: P.Export | None = None, client_flags: int = 3, tls: bool = False):
        self.conn = P.ServerConnection(export or P.Export(name="rram", size=SIZE, description="test"), tls=tls)
        self.out = bytearray(self.conn.data_to_send())
        magic, opt_magic, flags = P.GREETING.unpack_from(self.out)
        assert (magic, opt_magic, flags) == (P.NBDMAGIC, P.IHAVEOPT, 3)
        del self.out[:P.GREETING.size]
        self.events = []
        self.send(struct.pack(">I", client_flags))

    def send(self, data: bytes) -> list:
        self.conn.receive_data(data)
        events = []
        while True:
            ev = self.conn.next_event()
            self.out += self.conn.data_to_send()
            if ev is P.NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, P.Closed):
                break
        self.events += events
        return events

    def option_replies(self) -> list[tuple[int, int, bytes]]:
        replies = []
        while len(self.out) >= OPT_HDR.size:
            magic, option, kind, length = OPT_HDR.unpack_from(self.out)
            assert magic == P.NBD_REP_MAGIC
            replies.append((option, kind, bytes(self.out[OPT_HDR.size:OPT_HDR.size + length])))
            del self.out[:OPT_HDR.size + length]
        return replies

    def simple_reply(self) -> tuple[int, int]:
        magic, error, handle = P.SIMPLE_REPLY.unpack_from(self.out)
        assert magic == P.NBD_SIMPLE_REPLY_MAGIC
        del self.out[:P.SIMPLE_REPLY.size]
        return error, handle

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, kind, handle, length = P.STRUCTURED_REPLY.unpack_from(self.out)
        assert magic == P.NBD_STRUCTURED_REPLY_MAGIC
        payload = bytes(self.out[P.STRUCTURED_REPLY.size:P.STRUCTURED_REPLY.size + length])
        del self.out[:P.STRUCTURED_REPLY.size + length]
        return flags, kind, handle, payload

    def go(self, structured: bool = False, name: str = "rram", infos=(P.NBD_INFO_BLOCK_SIZE,)) -> P.Ready:
        if structured:
            self.send(opt(P.NBD_OPT_STRUCTURED_REPLY))
        (ready,) = self.send(opt(P.NBD_OPT_GO, go_data(name, infos)))
        assert isinstance(ready, P.Ready)
        replies = self.option_replies()
        assert replies[-1][1] == P.NBD_REP_ACK
        return ready


# -- handshake -----------------------------------------------------------------------------------

def test_unknown_client_flags_end_the_connection():
    with pytest.raises(P.StreamError, match="client flags"):
        Peer(client_flags=0x10)


def test_bad_option_magic_ends_the_connection():
    p = Peer()
    with pytest.raises(P.StreamError, match="option magic"):
        p.send(struct.pack(">QII", 0x1234, P.NBD_OPT_GO, 0))


def test_oversized_option_ends_the_connection():
    p = Peer()
    with pytest.raises(P.StreamError, match="limit"):
        p.send(struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, P.MAX_OPTION_LENGTH + 1))


def test_list_unknown_starttls_and_structured():
    p = Peer()
    p.send(opt(P.NBD_OPT_LIST))
    p.send(opt(P.NBD_OPT_LIST, b"x"))
    p.send(opt(99, b"whatever"))
    p.send(opt(P.NBD_OPT_STARTTLS))
    p.send(opt(P.NBD_OPT_STRUCTURED_REPLY))
    r = p.option_replies()
    assert r[0] == (P.NBD_OPT_LIST, P.NBD_REP_SERVER, struct.pack(">I", 4) + b"rram")
    assert r[1] == (P.NBD_OPT_LIST, P.NBD_REP_ACK, b"")
    assert r[2][:2] == (P.NBD_OPT_LIST, P.NBD_REP_ERR_INVALID)
    assert r[3][:2] == (99, P.NBD_REP_ERR_UNSUP)
    assert r[4][:2] == (P.NBD_OPT_STARTTLS, P.NBD_REP_ERR_POLICY)
    assert r[5] == (P.NBD_OPT_STRUCTURED_REPLY, P.NBD_REP_ACK, b"")
    assert p.conn.structured and not p.conn.in_transmission


def test_info_reports_export_name_description_block_size():
    p = Peer()
    p.send(opt(P.NBD_OPT_INFO, go_data("rram", (P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE))))
    infos = {struct.unpack_from(">H", d)[0]: d[2:] for _, kind, d in p.option_replies() if kind == P.NBD_REP_INFO}
    size, flags = struct.unpack(">QH", infos[P.NBD_INFO_EXPORT])
    assert size == SIZE
    for f in (P.NBD_FLAG_HAS_FLAGS, P.NBD_FLAG_SEND_FLUSH, P.NBD_FLAG_SEND_FUA, P.NBD_FLAG_SEND_TRIM,
              P.NBD_FLAG_SEND_WRITE_ZEROES, P.NBD_FLAG_CAN_MULTI_CONN):
        assert flags & f
    assert not flags & P.NBD_FLAG_READ_ONLY
    assert infos[P.NBD_INFO_NAME] == b"rram" and infos[P.NBD_INFO_DESCRIPTION] == b"test"
    assert struct.unpack(">III", infos[P.NBD_INFO_BLOCK_SIZE]) == (1, 4096, P.DEFAULT_MAX_BLOCK)
    assert not p.conn.in_transmission  # INFO does not end haggling


@pytest.mark.parametrize("data, reply", [
    (go_data("nope"), P.NBD_REP_ERR_UNKNOWN),
    (b"\0\0", P.NBD_REP_ERR_INVALID),
    (struct.pack(">I", 100) + b"rram\0\0", P.NBD_REP_ERR_INVALID),
    (go_data("rram", (1, 2))[:-2], P.NBD_REP_ERR_INVALID),
    (go_data("\udcff".encode("utf-8", "surrogatepass").decode("latin-1")), P.NBD_REP_ERR_UNKNOWN),
    (struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0", P.NBD_REP_ERR_INVALID),
])
def test_bad_go_is_an_error_reply_and_haggling_goes_on(data, reply):
    p = Peer()
    assert p.send(opt(P.NBD_OPT_GO, data)) == []
    assert p.option_replies()[-1][:2] == (P.NBD_OPT_GO, reply)
    p.go()  # the same connection can still succeed


def test_go_without_block_size_when_alignment_is_required():
    p = Peer(P.Export(name="rram", size=SIZE, min_block=512))
    p.send(opt(P.NBD_OPT_GO, go_data("rram")))
    assert p.option_replies()[-1][:2] == (P.NBD_OPT_GO, P.NBD_REP_ERR_BLOCK_SIZE_REQD)
    p.go(infos=(P.NBD_INFO_BLOCK_SIZE,))


@pytest.mark.parametrize("client_flags, zeroes", [(3, 0), (1, 124)])
def test_export_name(client_flags, zeroes):
    p = Peer(client_flags=client_flags)
    (ready,) = p.send(opt(P.NBD_OPT_EXPORT_NAME, b""))  # the default export
    assert isinstance(ready, P.Ready) and p.conn.in_transmission
    size, flags = P.EXPORT_NAME_REPLY.unpack_from(p.out)
    assert size == SIZE and flags & P.NBD_FLAG_HAS_FLAGS
    assert bytes(p.out[P.EXPORT_NAME_REPLY.size:]) == bytes(zeroes)


def test_export_name_unknown_ends_the_connection():
    with pytest.raises(P.StreamError, match="unknown export"):
        Peer().send(opt(P.NBD_OPT_EXPORT_NAME, b"other"))


def test_abort():
    p = Peer()
    (ev,) = p.send(opt(P.NBD_OPT_ABORT))
    assert isinstance(ev, P.Closed)
    assert p.option_replies() == [(P.NBD_OPT_ABORT, P.NBD_REP_ACK, b"")]


# -- transmission --------------------------------------------------------------------------------

def test_requests_split_across_feeds_byte_by_byte():
    p = Peer()
    p.go()
    stream = req(P.NBD_CMD_WRITE, 4096, 5, P.NBD_CMD_FLAG_FUA, 1, b"hello") + req(P.NBD_CMD_READ, 0, 4096, 0, 2)
    events = []
    for i in range(len(stream)):
        events += [(e.command, e.flags, e.handle, e.offset, e.length, e.data and bytes(e.data))
                   for e in p.send(stream[i:i + 1])]
    assert events == [(P.NBD_CMD_WRITE, 1, 1, 4096, 5, b"hello"), (P.NBD_CMD_READ, 0, 2, 0, 4096, None)]


def test_buffered_protocol_path_grows_for_a_large_write():
    conn = P.ServerConnection(P.Export(size=SIZE), initial_buffer=4096)
    conn.data_to_send()
    stream = struct.pack(">I", 3) + opt(P.NBD_OPT_GO, go_data()) + req(P.NBD_CMD_WRITE, 0, 65536, data=b"z" * 65536)
    pos, events = 0, []
    while True:
        ev = conn.next_event()
        if ev is P.NEED_DATA:
            if pos == len(stream):
                break
            buf = conn.get_buffer()
            n = min(len(buf), 1000, len(stream) - pos)
            buf[:n] = stream[pos:pos + n]
            pos += n
            conn.buffer_updated(n)
        else:
            events.append(ev)
    assert isinstance(events[0], P.Ready)
    assert bytes(events[1].data) == b"z" * 65536


@pytest.mark.parametrize("request_bytes, error", [
    (req(P.NBD_CMD_READ, SIZE - 4096, 8192), P.NBD_EINVAL),
    (req(P.NBD_CMD_READ, 2**64 - 1, 1), P.NBD_EINVAL),
    (req(P.NBD_CMD_WRITE, SIZE, 3, data=b"abc"), P.NBD_ENOSPC),
    (req(P.NBD_CMD_TRIM, SIZE - 512, 1024), P.NBD_ENOSPC),
    (req(P.NBD_CMD_WRITE_ZEROES, SIZE, 1), P.NBD_ENOSPC),
    (req(P.NBD_CMD_READ, 0, P.DEFAULT_MAX_BLOCK + 1), P.NBD_EINVAL),
    (req(9, 0, 0), P.NBD_EINVAL),
    (req(5, 0, 4096), P.NBD_EINVAL),  # NBD_CMD_CACHE: not advertised
    (req(P.NBD_CMD_WRITE, 0, 1, flags=P.NBD_CMD_FLAG_NO_HOLE, data=b"x"), P.NBD_EINVAL),
    (req(P.NBD_CMD_READ, 0, 512, flags=P.NBD_CMD_FLAG_DF), P.NBD_EINVAL),  # DF needs structured replies
    (req(P.NBD_CMD_FLUSH, 4096, 0), P.NBD_EINVAL),
])
def test_bad_requests_get_the_spec_error_and_the_stream_goes_on(request_bytes, error):
    p = Peer(P.Export(name="rram", size=SIZE, max_block=P.DEFAULT_MAX_BLOCK))
    p.go()
    assert p.send(request_bytes) == []
    assert p.simple_reply() == (error, 7)
    (ev,) = p.send(req(P.NBD_CMD_FLUSH, handle=8))
    assert (ev.command, ev.handle) == (P.NBD_CMD_FLUSH, 8)


def test_misaligned_requests_with_a_minimum_block_size():
    p = Peer(P.Export(name="rram", size=SIZE, min_block=512))
    p.go()
    for bad in (req(P.NBD_CMD_READ, 100, 512), req(P.NBD_CMD_WRITE, 0, 100, data=b"x" * 100)):
        assert p.send(bad) == []
        assert p.simple_reply() == (P.NBD_EINVAL, 7)
    (ev,) = p.send(req(P.NBD_CMD_READ, 512, 1024))
    assert (ev.offset, ev.length) == (512, 1024)


def test_overlong_write_is_drained_then_refused():
    p = Peer(P.Export(name="rram", size=SIZE, max_block=4096))
    p.go()
    assert p.send(req(P.NBD_CMD_WRITE, 0, 10000, data=b"q" * 5000)) == []
    assert p.send(b"q" * 5000 + req(P.NBD_CMD_FLUSH, handle=9))[0].handle == 9
    assert p.simple_reply() == (P.NBD_EINVAL, 7)


@pytest.mark.parametrize("stream, match", [
    (req(P.NBD_CMD_WRITE, 0, 0xFFFFFFFF), "NBD_CMD_WRITE"),
    (struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 0, 0, 0), "request magic"),
])
def test_unrecoverable_streams_end_the_connection(stream, match):
    p = Peer()
    p.go()
    with pytest.raises(P.StreamError, match=match):
        p.send(stream)


def test_disc():
    p = Peer()
    p.go()
    (ev,) = p.send(req(P.NBD_CMD_DISC))
    assert isinstance(ev, P.Closed) and p.out == b""


def test_structured_read_replies():
    p = Peer()
    p.go(structured=True)
    (r,) = p.send(req(P.NBD_CMD_READ, 8192, 4, flags=P.NBD_CMD_FLAG_DF, handle=3))
    buf = bytearray(p.conn.read_header_size + 4)
    hsz = p.conn.pack_read_header(buf, r)
    buf[hsz:] = b"data"
    p.out += buf
    assert p.chunk() == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 3, struct.pack(">Q", 8192) + b"data")
    # an invalid READ is still a structured reply (error chunk with a message)
    p.send(req(P.NBD_CMD_READ, SIZE, 1, handle=4))
    flags, kind, handle, payload = p.chunk()
    assert (flags, kind, handle) == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, 4)
    err, mlen = P.ERROR_CHUNK.unpack_from(payload)
    assert err == P.NBD_EINVAL and b"beyond" in payload[6:6 + mlen]
    # a failed READ says where; a zero-length READ is just "done"
    p.conn.reply(r, P.NBD_EIO, "disk on fire")
    p.out += p.conn.data_to_send()
    flags, kind, handle, payload = p.chunk()
    assert kind == P.NBD_REPLY_TYPE_ERROR_OFFSET and payload.endswith(struct.pack(">Q", 8192))
    p.send(req(P.NBD_CMD_READ, 0, 0, handle=5))
    assert p.chunk() == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 5, b"")
    # other commands keep simple replies
    (w,) = p.send(req(P.NBD_CMD_WRITE, 0, 1, handle=6, data=b"x"))
    p.conn.reply(w)
    p.out += p.conn.data_to_send()
    assert p.simple_reply() == (0, 6)


def test_export_validation():
    with pytest.raises(errors.ConfigError):
        P.Export(min_block=3)
    with pytest.raises(errors.ConfigError):
        P.Export(min_block=512, max_block=1000)


# -- fuzzing: nothing but StreamError escapes, whatever the bytes ----------------------------------

_chunks = st.one_of(
    st.binary(max_size=64),
    st.builds(opt, st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 99]), st.binary(max_size=40)),
    st.builds(lambda n, i: opt(P.NBD_OPT_GO, go_data(n, i)), st.sampled_from(["", "rram", "x"]),
              st.lists(st.integers(0, 5), max_size=4)),
    st.builds(req, st.integers(0, 9), st.sampled_from([0, 1, 511, 4096, SIZE - 1, SIZE, 2**64 - 1]),
              st.sampled_from([0, 1, 512, 4096, 70000, 2**32 - 1]), st.integers(0, 31)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0, 1, 2, 3, 7]), st.lists(_chunks, max_size=12), st.integers(1, 97))
def test_fuzz_parser_raises_only_stream_errors(client_flags, chunks, step):
    conn = P.ServerConnection(P.Export(name="rram", size=SIZE, min_block=512, max_block=65536), initial_buffer=4096)
    stream = struct.pack(">I", client_flags) + opt(P.NBD_OPT_GO, go_data("rram", (3,))) + b"".join(chunks)
    try:
        for i in range(0, len(stream), step):
            conn.receive_data(stream[i:i + step])
            while True:
                ev = conn.next_event()
                conn.data_to_send()
                if ev is P.NEED_DATA or isinstance(ev, P.Closed):
                    break
                if isinstance(ev, P.Request):
                    assert ev.offset + ev.length <= SIZE and ev.length <= 65536
                    assert ev.offset % 512 == 0 and ev.length % 512 == 0
                    conn.reply(ev)
            if isinstance(ev, P.Closed):
                break
    except P.StreamError:
        pass


# -- backends --------------------------------------------------------------------------------------

@pytest.fixture(params=["memory", "pagestore"])
def backend(request):
    with export_backend(request.param, SIZE) as b:
        yield b


def _read(b, offset, length) -> bytes:
    out = bytearray(length)
    b.read(offset, length, memoryview(out))
    return bytes(out)


def test_backend_against_a_reference_model(backend):
    rng = np.random.default_rng(1)
    model = bytearray(SIZE)
    for _ in range(150):
        op = rng.integers(0, 4)
        offset = int(rng.integers(0, SIZE))
        if rng.integers(0, 2):
            offset -= offset % 4096
        length = int(rng.integers(0, min(SIZE - offset, 3 * 4096 + 100) + 1))
        if op == 0:
            data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            backend.write(offset, data, fua=bool(rng.integers(0, 2)))
            model[offset:offset + length] = data
        elif op == 1:
            no_hole = bool(rng.integers(0, 2))
            backend.zero(offset, length, no_hole)
            model[offset:offset + length] = bytes(length)
        elif op == 2:
            assert _read(backend, offset, length) == model[offset:offset + length]
        else:
            backend.flush()
    assert hashlib.sha256(_read(backend, 0, SIZE)).digest() == hashlib.sha256(model).digest()


def test_pagestore_backend_trim_drops_whole_pages_only():
    providers = [InProcessProvider("p0", 8 << 20)]
    store = make_store(providers, local_budget=256 << 10)
    try:
        b = PageStoreBackend(store, store.create_pool(), size=SIZE)
        b.write(0, b"\x5a" * 3 * 4096)
        assert store.stats()["pages"] == 3
        b.trim(100, 2 * 4096)  # covers page 1 only entirely
        assert store.stats()["pages"] == 2
        assert _read(b, 4096, 4096) == bytes(4096)
        assert _read(b, 0, 4096) == b"\x5a" * 4096
        with pytest.raises(errors.ConfigError):
            PageStoreBackend(store, 0, size=4095)
    finally:
        store.close()
        providers[0].close()
