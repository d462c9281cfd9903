"""TCP data-channel frames: sans-IO, versioned, length-checked.

Every frame starts with one 32-byte header (little-endian)::

    offset size field
     0     4    magic        b"RRMD"
     4     1    version      2 (a peer speaking another version is refused with a clear error)
     5     1    type         HELLO 1, HELLO_OK 2, REQUEST 3, COMPLETION 4, ERROR 5, CHALLENGE 6
     6     2    flags        REQUEST, COMPLETION: FLAG_MAC (1) once the handshake set a frame key;
                             else 0
     8     8    batch_id     REQUEST / COMPLETION: the requester's batch id; else 0
    16     4    count        REQUEST: operations (1..MAX_OPS); COMPLETION: index of the first
                             failing op (n on success); ERROR: error code; else 0
    20     4    status       COMPLETION: ibv_wc_status (signed); else 0
    24     4    payload_len  bytes after the header and the op descriptors
    28     4    seq          with FLAG_MAC: the frame's number on the connection in its direction
                             (REQUESTs 0, 1, ... and COMPLETIONs 0, 1, ..., two counters); else 0

Bodies::

    CHALLENGE   payload = a fresh nonce (NONCE_SIZE bytes)           provider -> requester, first
    HELLO       payload = session token (TOKEN_SIZE) + hello_mac     requester -> provider
    HELLO_OK    payload = hello_ok_mac (MAC_SIZE)                    provider -> requester
    REQUEST     count x WIRE_OP descriptors, then the WRITE data of the batch concatenated in
                op order (payload_len = sum of the WRITE lengths), then with FLAG_MAC a
                MAC_TRAILER-byte request_mac over the header and descriptors
    COMPLETION  payload = the READ data of the executed ops, concatenated in op order, then with
                FLAG_MAC a MAC_TRAILER-byte completion_mac over the header
    ERROR       payload = UTF-8 message (<= MAX_MESSAGE); the sender closes the connection

One WIRE_OP descriptor (24 bytes)::

     0  8  remote_addr   u64
     8  4  length        u32
    12  4  rkey          u32
    16  1  opcode        0 READ, 1 WRITE
    17  7  reserved

The handshake binds a connection to its session: both MACs are keyed with the session's
secret, which each side derived from the control handshake (never sent), and cover the
provider's fresh nonce, so a sniffed token or a replayed HELLO is refused, and a requester
knows it reached the provider that holds its session.  Both then derive the connection's
frame key (``frame_key``): every REQUEST carries its sequence number and a MAC of its header
and descriptors, so an on-path attacker cannot alter where a batch reads or writes, nor
replay, reorder or inject one.  Every COMPLETION carries its own sequence number and a MAC of
its header (batch id, status, index of the failing op, READ byte count) under a second key
derived from the frame key with its own label (``completion_key``), so a request's MAC can
never pass as a completion's: an attacker can neither turn a failed WRITE into a success nor
replay, reorder or inject a completion.  Not covered: the bytes themselves (WRITE data and
READ data; sealed pages carry their own AEAD tag, see README "Security model"), and ERROR
frames (an attacker who can inject one can as well cut the TCP connection).

A bad key or range is an error COMPLETION (the connection stays usable); broken framing
(wrong magic/version/type, lengths over the limits) is a ``ProtocolError``: the receiver sends
an ERROR frame and closes.  The decoder checks every length against the limits *before*
buffering for it, so hostile headers cannot make it allocate.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ProtocolError

MAGIC = b"RRMD"
#: 2: COMPLETIONs carry a sequence number and a MAC (1 had none)
VERSION = 2

HELLO = 1
HELLO_OK = 2
REQUEST = 3
COMPLETION = 4
ERROR = 5
CHALLENGE = 6
TYPE_NAMES = {HELLO: "HELLO", HELLO_OK: "HELLO_OK", REQUEST: "REQUEST", COMPLETION: "COMPLETION", ERROR: "ERROR",
              CHALLENGE: "CHALLENGE"}

#: frames each side may receive
TO_PROVIDER = frozenset({HELLO, REQUEST})
TO_REQUESTER = frozenset({CHALLENGE, HELLO_OK, COMPLETION, ERROR})

MAX_OPS = 4096
MAX_OP_LENGTH = 1 << 20
MAX_PAYLOAD = 64 << 20
MAX_MESSAGE = 4096
TOKEN_SIZE = 32
NONCE_SIZE = 32
MAC_SIZE = 32
FLAG_MAC = 1
MAC_TRAILER = 16
#: frames that carry a sequence number and a MAC once the connection has a frame key
SIGNED = frozenset({REQUEST, COMPLETION})
COMPLETION_LABEL = b"rram-data-completions\0"
#: no frame carries this number: a connection that used up the others is replaced (a wrap
#: would let a frame 2**32 back be replayed)
SEQ_END = 0xFFFFFFFF

# ERROR codes
E_BAD_FRAME = 1  # framing broken: the connection is closed
E_BAD_TOKEN = 2  # HELLO named no live session
E_SESSION_CLOSED = 3  # the provider closed the session
E_SHUTDOWN = 4  # the provider is shutting down
E_BUSY = 5  # a cap or the provider's I/O budget refused the connection or the frame
ERROR_NAMES = {E_BAD_FRAME: "bad frame", E_BAD_TOKEN: "bad token", E_SESSION_CLOSED: "session closed",
               E_SHUTDOWN: "provider shutting down", E_BUSY: "provider busy"}

HEADER = struct.Struct("<4sBBHQIiII")
assert HEADER.size == 32
WIRE_OP = np.dtype(
    [("remote_addr", "<u8"), ("length", "<u4"), ("rkey", "<u4"), ("opcode", "u1"), ("_reserved", "u1", (7,))]
)
assert WIRE_OP.itemsize == 24
MAX_FRAME = HEADER.size + MAX_OPS * WIRE_OP.itemsize + MAX_PAYLOAD


@dataclass(frozen=True)
class Header:
    type: int
    batch_id: int
    count: int
    status: int
    payload_len: int
    flags: int = 0
    seq: int = 0

    @property
    def body_len(self) -> int:
        """Bytes that follow the header."""
        ops = self.count * WIRE_OP.itemsize if self.type == REQUEST else 0
        return ops + self.payload_len + (MAC_TRAILER if self.flags & FLAG_MAC else 0)


@dataclass(frozen=True)
class Challenge:
    nonce: bytes


@dataclass(frozen=True)
class Hello:
    token: bytes
    mac: bytes


@dataclass(frozen=True)
class HelloOk:
    mac: bytes


@dataclass(frozen=True)
class Request:
    """``ops`` and ``payload`` are views into the decoder's buffer (see ``Decoder``)."""

    batch_id: int
    count: int
    ops: memoryview
    payload: memoryview


@dataclass(frozen=True)
class Completion:
    batch_id: int
    status: int
    index: int
    data: memoryview


@dataclass(frozen=True)
class Error:
    code: int
    message: str

    def describe(self) -> str:
        return f"{ERROR_NAMES.get(self.code, f'error {self.code}')}: {self.message}"


def parse_header(buf, offset: int = 0, accept: frozenset = TO_PROVIDER | TO_REQUESTER) -> Header:
    """Decode and check one header at ``buf[offset:offset+32]``; raises ProtocolError."""
    magic, version, ftype, flags, batch_id, count, status, payload_len, seq = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r} (not an rram data connection?)")
    if version != VERSION:
        raise ProtocolError(f"unsupported data protocol version {version}, this side speaks {VERSION} "
                            "(both ends must run the same rram release)")
    if ftype not in accept:
        name = TYPE_NAMES.get(ftype, f"unknown type {ftype}")
        raise ProtocolError(f"unexpected frame {name} (expected one of {sorted(TYPE_NAMES[t] for t in accept)})")
    if ftype == REQUEST:
        if not 1 <= count <= MAX_OPS:
            raise ProtocolError(f"request with {count} operations; allowed 1..{MAX_OPS}")
        if payload_len > MAX_PAYLOAD:
            raise ProtocolError(f"request payload of {payload_len} bytes exceeds the limit of {MAX_PAYLOAD}")
    elif ftype == COMPLETION:
        if payload_len > MAX_PAYLOAD:
            raise ProtocolError(f"completion payload of {payload_len} bytes exceeds the limit of {MAX_PAYLOAD}")
    elif ftype == HELLO:
        if payload_len != TOKEN_SIZE + MAC_SIZE:
            raise ProtocolError(f"hello carries {payload_len} bytes, expected a {TOKEN_SIZE}-byte token and a "
                                f"{MAC_SIZE}-byte MAC")
    elif ftype == CHALLENGE:
        if payload_len != NONCE_SIZE:
            raise ProtocolError(f"challenge carries {payload_len} bytes, expected a {NONCE_SIZE}-byte nonce")
    elif ftype == HELLO_OK:
        if payload_len != MAC_SIZE:
            raise ProtocolError(f"hello_ok carries {payload_len} bytes, expected a {MAC_SIZE}-byte MAC")
    elif ftype == ERROR:
        if payload_len > MAX_MESSAGE:
            raise ProtocolError(f"error message of {payload_len} bytes exceeds the limit of {MAX_MESSAGE}")
    elif payload_len:
        raise ProtocolError(f"{TYPE_NAMES[ftype]} frame with a {payload_len}-byte payload, expected none")
    if flags & ~FLAG_MAC or (flags and ftype not in SIGNED):
        raise ProtocolError(f"{TYPE_NAMES[ftype]} frame with unknown flags {flags:#x}")
    return Header(ftype, batch_id, count, status, payload_len, flags, seq)


def parse_body(h: Header, body: memoryview):
    """The event for a checked header and its ``h.body_len`` bytes of body."""
    if h.type == REQUEST:
        split = h.count * WIRE_OP.itemsize
        return Request(h.batch_id, h.count, body[:split], body[split : split + h.payload_len])
    if h.type == COMPLETION:
        return Completion(h.batch_id, h.status, h.count, body[: h.payload_len])
    if h.type == HELLO:
        return Hello(bytes(body[:TOKEN_SIZE]), bytes(body[TOKEN_SIZE:]))
    if h.type == ERROR:
        return Error(h.count, bytes(body).decode("utf-8", "replace"))
    if h.type == CHALLENGE:
        return Challenge(bytes(body))
    return HelloOk(bytes(body))


# -- encoders -----------------------------------------------------------------------------------


def pack_header(buf, ftype: int, batch_id: int = 0, count: int = 0, status: int = 0, payload_len: int = 0) -> None:
    """Write a header into ``buf[0:32]`` (a frame built in place, payload after it)."""
    HEADER.pack_into(buf, 0, MAGIC, VERSION, ftype, 0, batch_id, count, status, payload_len, 0)


def header(ftype: int, batch_id: int = 0, count: int = 0, status: int = 0, payload_len: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, 0, batch_id, count, status, payload_len, 0)


def hello_mac(secret: bytes, nonce: bytes, token: bytes) -> bytes:
    """The requester's proof that it holds the session's secret, for this connection only."""
    return hmac.new(secret, b"rram-data-hello\0" + nonce + token, hashlib.sha256).digest()


def hello_ok_mac(secret: bytes, nonce: bytes, token: bytes) -> bytes:
    """The provider's proof, back (a distinct label: neither MAC can be reflected as the other)."""
    return hmac.new(secret, b"rram-data-hello-ok\0" + nonce + token, hashlib.sha256).digest()


def frame_key(secret: bytes, nonce: bytes, token: bytes) -> bytes:
    """The key that signs this connection's REQUEST frames (both ends derive it after HELLO)."""
    return hmac.new(secret, b"rram-data-frames\0" + nonce + token, hashlib.sha256).digest()


def request_mac(key: bytes, header_and_descriptors: bytes) -> bytes:
    return hmac.new(key, header_and_descriptors, hashlib.sha256).digest()[:MAC_TRAILER]


def completion_key(key: bytes) -> bytes:
    """The key of the provider -> requester direction, from the connection's frame ``key``: a
    distinct key, so that no REQUEST's MAC is ever a valid COMPLETION MAC (or the reverse)."""
    return hmac.new(key, COMPLETION_LABEL, hashlib.sha256).digest()


def completion_mac(ckey: bytes, header_: bytes) -> bytes:
    """The MAC of a COMPLETION under ``completion_key(key)``, over its 32-byte header."""
    return hmac.new(ckey, header_, hashlib.sha256).digest()[:MAC_TRAILER]


def challenge(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    return header(CHALLENGE, payload_len=NONCE_SIZE) + nonce


def hello(token: bytes, mac: bytes) -> bytes:
    if len(token) != TOKEN_SIZE or len(mac) != MAC_SIZE:
        raise ValueError(f"token and MAC must be {TOKEN_SIZE} and {MAC_SIZE} bytes")
    return header(HELLO, payload_len=TOKEN_SIZE + MAC_SIZE) + token + mac


def hello_ok(mac: bytes) -> bytes:
    if len(mac) != MAC_SIZE:
        raise ValueError(f"MAC must be {MAC_SIZE} bytes")
    return header(HELLO_OK, payload_len=MAC_SIZE) + mac


def error(code: int, message: str) -> bytes:
    data = message.encode("utf-8")[:MAX_MESSAGE]
    return header(ERROR, count=code, payload_len=len(data)) + data


def request(batch_id: int, ops: np.ndarray, payload: bytes = b"", key: bytes | None = None, seq: int = 0) -> bytes:
    """A REQUEST frame from a ``WIRE_OP`` array, signed as request ``seq`` when a frame ``key``
    is given (tests and tools; the endpoint builds frames in C)."""
    descs = np.ascontiguousarray(ops, dtype=WIRE_OP)
    if key is None:
        return header(REQUEST, batch_id, len(descs), payload_len=len(payload)) + descs.tobytes() + bytes(payload)
    head = HEADER.pack(MAGIC, VERSION, REQUEST, FLAG_MAC, batch_id, len(descs), 0, len(payload), seq)
    return head + descs.tobytes() + bytes(payload) + request_mac(key, head + descs.tobytes())


def completion(batch_id: int, status: int, index: int, data: bytes = b"", key: bytes | None = None,
               seq: int = 0) -> bytes:
    """A COMPLETION frame, signed as completion ``seq`` when the connection's frame ``key`` is
    given (the completion key is derived from it, as both ends do)."""
    if key is None:
        return header(COMPLETION, batch_id, index, status, len(data)) + bytes(data)
    head = HEADER.pack(MAGIC, VERSION, COMPLETION, FLAG_MAC, batch_id, index, status, len(data), seq)
    return head + bytes(data) + completion_mac(completion_key(key), head)


# -- decoder ------------------------------------------------------------------------------------


class Decoder:
    """Bytes in, events out.

    Either ``feed(data)`` or receive straight into ``writable()`` and report ``wrote(n)``;
    then drain ``next_event()`` until it returns None.  Views inside events stay valid until
    the next ``feed``/``writable`` call.  The buffer grows as bytes arrive (doubling), never
    ahead of them, and never past the size a *checked* header announced (+ ``min_free``).

    With the connection's frame ``key`` it checks what the C cores check: every REQUEST and
    COMPLETION must be signed, numbered in order (one counter each) and carry a valid MAC; a
    frame that is not is a ProtocolError and nothing of it is returned.  Without a key it only
    parses (a signed frame's trailer is skipped unchecked).
    """

    def __init__(self, accept: frozenset, initial: int = 1 << 16, key: bytes | None = None):
        self.accept = accept
        self._keys = None if key is None else {REQUEST: key, COMPLETION: completion_key(key)}
        self._seq = {REQUEST: 0, COMPLETION: 0}
        self._buf = bytearray(initial)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._header: Header | None = None

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def _need(self) -> int:
        """Bytes the frame at the front needs in total (header only until it is parsed)."""
        return HEADER.size + (self._header.body_len if self._header else 0)

    def writable(self, min_free: int = 4096) -> memoryview:
        """A view of free space at the end of the buffer, compacting or growing as needed."""
        if len(self._buf) - self._end >= min_free:
            return self._view[self._end :]
        want = self.buffered + min_free
        need = self._need()
        if need > self.buffered:  # a partial frame: make room for more of it, doubling at most
            want = max(want, min(need, 2 * len(self._buf)))
        if want > len(self._buf):
            new = bytearray(want)  # a fresh buffer: old event views keep the old one alive
            new[: self.buffered] = self._view[self._start : self._end]
            self._buf, self._view = new, memoryview(new)
        else:
            self._view[: self.buffered] = self._view[self._start : self._end]
        self._start, self._end = 0, self.buffered
        return self._view[self._end :]

    def wrote(self, n: int) -> None:
        if not 0 <= n <= len(self._buf) - self._end:
            raise ValueError(f"wrote {n} bytes into {len(self._buf) - self._end} free")
        self._end += n

    def feed(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            room = self.writable(min(len(data), 1 << 20))
            n = min(len(room), len(data))
            room[:n] = data[:n]
            self.wrote(n)
            data = data[n:]

    def next_event(self):
        """The next complete event, or None if more bytes are needed; raises ProtocolError."""
        if self._header is None:
            if self.buffered < HEADER.size:
                return None
            self._header = parse_header(self._view, self._start, self.accept)
        h = self._header
        total = HEADER.size + h.body_len
        if self.buffered < total:
            return None
        body = self._view[self._start + HEADER.size : self._start + total]
        if self._keys is not None and h.type in SIGNED:
            self._verify(h, self._view[self._start : self._start + HEADER.size], body)
        self._start += total
        self._header = None
        if self._start == self._end:
            self._start = self._end = 0  # frames consumed: the next recv starts at the front
        return parse_body(h, body)

    def _verify(self, h: Header, head: memoryview, body: memoryview) -> None:
        name = TYPE_NAMES[h.type]
        if not h.flags & FLAG_MAC:
            raise ProtocolError(f"unsigned {name} on a connection with a frame key")
        signed = bytes(head) + (bytes(body[: h.count * WIRE_OP.itemsize]) if h.type == REQUEST else b"")
        mac = (request_mac if h.type == REQUEST else completion_mac)(self._keys[h.type], signed)
        want = self._seq[h.type]
        if h.seq != want or want == SEQ_END or not hmac.compare_digest(mac, bytes(body[-MAC_TRAILER:])):
            raise ProtocolError(f"{name} {want} on this connection: bad MAC or sequence number {h.seq} "
                                "(altered, replayed, reordered or not signed with the connection's key)")
        self._seq[h.type] = want + 1

    def events(self):
        while (ev := self.next_event()) is not None:
            yield ev
