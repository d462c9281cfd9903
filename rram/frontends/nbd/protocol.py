"""The NBD protocol, server side, sans-IO: bytes in, events out (fixed newstyle only).

Constants are spelled as in the protocol spec (NetworkBlockDevice/nbd doc/proto.md).

The caller owns the socket.  Like asyncio's BufferedProtocol, it reads straight into the
connection's preallocated receive buffer::

    conn = ServerConnection(export)
    sock.sendall(conn.data_to_send())              # the greeting
    while True:
        event = conn.next_event()
        sock.sendall(conn.data_to_send())          # option replies, error replies
        if event is NEED_DATA:
            n = sock.recv_into(conn.get_buffer()); ...; conn.buffer_updated(n)
        elif isinstance(event, Request): ... conn.reply(event) ...
        elif isinstance(event, Closed): break

TLS (``ServerConnection(export, tls=True)``) is the spec's FORCEDTLS mode: until the client
has sent NBD_OPT_STARTTLS, every option but STARTTLS and ABORT is answered with
NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME (which has no error reply) ends the connection.
STARTTLS is acknowledged and returns a ``StartTLS`` event: the caller runs the TLS handshake on
its socket and calls ``tls_started()``; option haggling then goes on inside TLS.  Bytes the client
sent after STARTTLS without waiting for its reply are plaintext that TLS would not cover, and
end the connection.

Requests that break a rule the client can recover from (out of bounds, misaligned, unknown
command or flag) are answered here with the error the spec asks for and never reach the
caller.  Bytes that cannot be resynchronised (bad magic, an absurd WRITE length, unknown
client flags) raise StreamError: the connection must be dropped.
"""
from __future__ import annotations

import dataclasses
import struct

from ... import errors

# The constants below are spelled as in the NBD spec, one per line (ovirt-imageio's way): blocks of
# them share a shape, not logic, so they stay a table to read against the spec.
# -- magic numbers ------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server, 16 bits) and client flags (32 bits) ------------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# -- transmission flags (16 bits) ---------------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# -- options ------------------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8

# -- option reply types -------------------------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8

# -- NBD_REP_INFO types -------------------------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# -- commands and command flags -----------------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2

# -- structured replies -------------------------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- error values (the spec's fixed numbers, not the host's errno) -----------------------------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ESHUTDOWN = 108

#: the largest READ/WRITE the spec says a client may expect to work everywhere
DEFAULT_MAX_BLOCK = 32 << 20
#: option data beyond this is a denial of service, not a negotiation (names are <= 4096 bytes)
MAX_OPTION_LENGTH = 64 << 10
#: a WRITE longer than max_block but below this is drained and refused with EINVAL; longer ones
#: are absurd and end the connection
MAX_DISCARD = 128 << 20
INITIAL_BUFFER = 1 << 20
_ZEROES = bytes(124)

# -- wire layouts -------------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")
"""S: 64 bits NBDMAGIC, 64 bits IHAVEOPT, 16 bits handshake flags."""

CLIENT_FLAGS = struct.Struct(">I")
"""C: 32 bits client flags."""

OPTION = struct.Struct(">QII")
"""C: 64 bits IHAVEOPT, 32 bits option, 32 bits length of option data; then the data."""

OPTION_REPLY = struct.Struct(">QIII")
"""S: 64 bits NBD_REP_MAGIC, 32 bits option, 32 bits reply type, 32 bits length; then the data."""

EXPORT_NAME_REPLY = struct.Struct(">QH")
"""S: 64 bits export size, 16 bits transmission flags; then 124 zero bytes unless NO_ZEROES."""

INFO_EXPORT = struct.Struct(">HQH")
"""NBD_REP_INFO data: 16 bits NBD_INFO_EXPORT, 64 bits size, 16 bits transmission flags."""

INFO_BLOCK_SIZE = struct.Struct(">HIII")
"""NBD_REP_INFO data: 16 bits NBD_INFO_BLOCK_SIZE, 32 bits minimum, preferred, maximum."""

REQUEST = struct.Struct(">IHHQQI")
"""C: 32 bits NBD_REQUEST_MAGIC, 16 bits command flags, 16 bits type, 64 bits handle,
64 bits offset, 32 bits length; then length bytes of data for NBD_CMD_WRITE."""

SIMPLE_REPLY = struct.Struct(">IIQ")
"""S: 32 bits NBD_SIMPLE_REPLY_MAGIC, 32 bits error, 64 bits handle; then data for a READ."""

STRUCTURED_REPLY = struct.Struct(">IHHQI")
"""S: 32 bits NBD_STRUCTURED_REPLY_MAGIC, 16 bits flags, 16 bits type, 64 bits handle,
32 bits payload length; then the payload."""

OFFSET_DATA = struct.Struct(">IHHQIQ")
"""A structured reply header followed by the 64-bit offset of NBD_REPLY_TYPE_OFFSET_DATA."""

ERROR_CHUNK = struct.Struct(">IH")
"""Error chunk payload: 32 bits error, 16 bits message length; then the message
(and, for NBD_REPLY_TYPE_ERROR_OFFSET, 64 bits offset)."""


# -- errors -------------------------------------------------------------------------------------

class NBDError(errors.ProtocolError):
    """Base of NBD errors; ``survives`` says whether the connection can go on."""

    survives = False


class StreamError(NBDError):
    """The byte stream cannot be resynchronised (bad magic, absurd length): hard disconnect."""

    survives = False


class RequestError(NBDError):
    """One request failed with an NBD error value; the reply carries it, the connection survives."""

    survives = True

    def __init__(self, error: int, message: str):
        super().__init__(message)
        self.error = error


# -- events -------------------------------------------------------------------------------------

class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""More bytes are needed: recv_into(get_buffer()), then buffer_updated(n)."""


@dataclasses.dataclass(frozen=True)
class Export:
    """What the server offers: one export, its size and block size constraints."""

    name: str = ""
    size: int = 0
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_BLOCK
    multi_conn: bool = True

    def __post_init__(self):
        for field in ("min_block", "preferred_block"):
            v = getattr(self, field)
            if v < 1 or v & (v - 1) or v > 1 << 16 and field == "min_block":
                raise errors.ConfigError(f"NBD {field} must be a power of two (min_block <= 65536), got {v}")
        if self.preferred_block < max(512, self.min_block):
            raise errors.ConfigError(f"NBD preferred_block {self.preferred_block} must be >= 512 and >= min_block")
        if self.max_block % self.min_block or not 0 < self.max_block <= 0xFFFFFFFF:
            raise errors.ConfigError(f"NBD max_block {self.max_block} must be a multiple of min_block, < 2**32")
        if self.size < 0 or self.size >= 1 << 63:
            raise errors.ConfigError(f"NBD export size {self.size} is out of range")
        if len(self.name.encode()) > 4096 or "\0" in self.name:
            raise errors.ConfigError("NBD export name must be <= 4096 bytes without NUL")

    def transmission_flags(self, structured: bool) -> int:
        flags = (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM
                 | NBD_FLAG_SEND_WRITE_ZEROES)
        if self.multi_conn:
            flags |= NBD_FLAG_CAN_MULTI_CONN
        if structured:
            flags |= NBD_FLAG_SEND_DF  # we always answer a READ with one content chunk
        return flags


@dataclasses.dataclass(frozen=True)
class Ready:
    """Option haggling is over; transmission starts with this export."""

    export: Export
    structured_replies: bool


@dataclasses.dataclass(frozen=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged: run the TLS handshake, then ``tls_started()``."""


@dataclasses.dataclass(frozen=True)
class Closed:
    """The client ended the session cleanly (NBD_CMD_DISC or NBD_OPT_ABORT)."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """A valid transmission request.  ``data`` (WRITE only) is a view into the receive buffer,
    valid until the next get_buffer() / receive_data() call."""

    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: memoryview | None = None

    @property
    def fua(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_FUA)


_ALLOWED_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
}
_WRITES = (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES)

_CLIENT_FLAGS = 0
_OPTIONS = 1
_TRANSMISSION = 2
_CLOSED = 3


class ServerConnection:
    """One client connection's protocol state: handshake, then transmission."""

    def __init__(self, export: Export, *, tls: bool = False, initial_buffer: int = INITIAL_BUFFER):
        self.export = export
        self.tls_required = tls  # FORCEDTLS: nothing but STARTTLS and ABORT before TLS
        self.tls_active = False
        self._tls_pending = False  # STARTTLS acknowledged, handshake not done yet
        self.structured = False
        self.no_zeroes = False
        self.fixed_newstyle = False
        self._state = _CLIENT_FLAGS
        self._buf = bytearray(max(initial_buffer, REQUEST.size + 4096))
        self._start = 0
        self._end = 0
        self._need = CLIENT_FLAGS.size  # bytes from _start that the next unit needs
        self._discard = 0  # payload bytes of a refused WRITE still to skip
        self._refused: tuple[int, str, int, int] | None = None
        self._out = bytearray()
        self._out += GREETING.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)

    # -- buffers --------------------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Free space at the end of the receive buffer, at least big enough for the next unit."""
        if self._start:
            pending = self._end - self._start
            if pending:
                self._buf[:pending] = self._buf[self._start:self._end]
            self._start, self._end = 0, pending
        if self._need > len(self._buf):
            self._grow(self._need)
        return memoryview(self._buf)[self._end:]

    def _grow(self, size: int) -> None:
        # a new object, not an in-place resize: views handed out earlier stay valid
        new = bytearray(size)
        new[: self._end - self._start] = self._buf[self._start:self._end]
        self._buf, self._end, self._start = new, self._end - self._start, 0

    def buffer_updated(self, n: int) -> None:
        if n < 0 or self._end + n > len(self._buf):
            raise ValueError(f"buffer_updated({n}) beyond the buffer")
        self._end += n

    def receive_data(self, data) -> None:
        """Copy ``data`` into the receive buffer (tests, fuzzing, callers without recv_into)."""
        data = memoryview(data).cast("B")
        free = self.get_buffer()
        if len(free) < len(data):
            self._grow(self._end + len(data))
            free = memoryview(self._buf)[self._end:]
        free[: len(data)] = data
        self._end += len(data)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def in_transmission(self) -> bool:
        return self._state == _TRANSMISSION

    # -- parsing --------------------------------------------------------------------------------

    def take_run(self, run) -> int:
        """Move the run of plain READs or WRITEs at the head of the buffer into ``run``.

        ``run`` is a rram._ext._nbdwire.RequestRun: the C parser takes only requests that
        need no reply from this module (valid, whole 4 KiB blocks, flags at most FUA), so
        next_event() still sees, and answers, everything else.  Returns the requests taken.
        """
        if self._state != _TRANSMISSION or self._discard:
            return 0
        before = run.nreq
        e = self.export
        self._start = run.parse(self._buf, self._start, self._end, e.size, e.max_block, e.min_block)
        taken = run.nreq - before
        if taken:
            self._need = REQUEST.size
        return taken

    def transmission_buffer(self):
        """(receive buffer, start, end) while plain transmission goes on, for a C loop that takes
        requests itself (rram._ext._nbdserve.serve_loop) and reports back with consumed(); else None."""
        if self._state != _TRANSMISSION or self._discard:
            return None
        return self._buf, self._start, self._end

    def consumed(self, start: int, end: int) -> None:
        """The C loop's new buffer bounds (it may have moved the unread bytes to the front)."""
        if not 0 <= start <= end <= len(self._buf):
            raise ValueError(f"bad buffer range {start}..{end} of {len(self._buf)}")
        self._start, self._end = start, end
        self._need = REQUEST.size

    def next_event(self):
        """The next event, or NEED_DATA.  Raises StreamError when the connection must be dropped."""
        while True:
            if self._state == _CLOSED:
                return Closed("closed")
            if self._discard:
                take = min(self._discard, self._end - self._start)
                self._start += take
                self._discard -= take
                if self._discard:
                    self._need = 0
                    return NEED_DATA
                err, msg, cmd, handle = self._refused
                self._error_reply(cmd, handle, err, msg)
                self._need = REQUEST.size
                continue
            if self._tls_pending:
                raise StreamError("tls_started() was not called after StartTLS")
            if self._end - self._start < self._need:
                return NEED_DATA
            if self._state == _CLIENT_FLAGS:
                event = self._client_flags()
            elif self._state == _OPTIONS:
                event = self._option()
            else:
                event = self._request()
            if event is not None:
                return event

    def _take(self, n: int) -> memoryview:
        view = memoryview(self._buf)[self._start:self._start + n]
        self._start += n
        return view

    def _client_flags(self):
        (flags,) = CLIENT_FLAGS.unpack(self._take(CLIENT_FLAGS.size))
        if flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise StreamError(f"unknown client flags {flags:#x}")
        self.fixed_newstyle = bool(flags & NBD_FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self._state = _OPTIONS
        self._need = OPTION.size

    # -- option haggling ------------------------------------------------------------------------

    def _option(self):
        magic, option, length = OPTION.unpack_from(self._buf, self._start)
        if magic != IHAVEOPT:
            raise StreamError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            raise StreamError(f"option {option} carries {length} bytes (limit {MAX_OPTION_LENGTH})")
        if self._end - self._start < OPTION.size + length:
            self._need = OPTION.size + length
            return None
        self._start += OPTION.size
        data = bytes(self._take(length))
        self._need = OPTION.size
        if option == NBD_OPT_STARTTLS:
            return self._starttls(data)
        if self.tls_required and not self.tls_active:
            if option == NBD_OPT_EXPORT_NAME:  # no error reply exists for it: the spec says hang up
                raise StreamError("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a TLS-only server")
            if option != NBD_OPT_ABORT:
                return self._option_error(option, NBD_REP_ERR_TLS_REQD, "this server requires TLS: "
                                          "send NBD_OPT_STARTTLS first")
        if option == NBD_OPT_EXPORT_NAME:
            name = _decode_name(data)
            if name is None or not self._known(name):
                raise StreamError(f"NBD_OPT_EXPORT_NAME for an unknown export {bytes(data)[:64]!r}")
            e = self.export
            self._out += EXPORT_NAME_REPLY.pack(e.size, e.transmission_flags(self.structured))
            if not self.no_zeroes:
                self._out += _ZEROES
            return self._enter_transmission()
        if option == NBD_OPT_ABORT:
            self._option_reply(option, NBD_REP_ACK)
            self._state = _CLOSED
            return Closed("NBD_OPT_ABORT")
        if option == NBD_OPT_LIST:
            if data:
                return self._option_error(option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            name = self.export.name.encode()
            self._option_reply(option, NBD_REP_SERVER, struct.pack(">I", len(name)) + name)
            self._option_reply(option, NBD_REP_ACK)
            return None
        if option == NBD_OPT_STRUCTURED_REPLY:
            if data:
                return self._option_error(option, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            self._option_reply(option, NBD_REP_ACK)
            return None
        if option in (NBD_OPT_INFO, NBD_OPT_GO):
            return self._info_or_go(option, data)
        return self._option_error(option, NBD_REP_ERR_UNSUP, f"option {option} is not supported")

    def _starttls(self, data: bytes):
        option = NBD_OPT_STARTTLS
        if not self.tls_required:
            return self._option_error(option, NBD_REP_ERR_POLICY, "this server does not offer TLS")
        if data:
            return self._option_error(option, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            return self._option_error(option, NBD_REP_ERR_INVALID, "TLS is already on")
        if self._end != self._start:
            raise StreamError(f"{self._end - self._start} plaintext bytes sent after NBD_OPT_STARTTLS "
                              "before its reply")
        self._option_reply(option, NBD_REP_ACK)
        self._tls_pending = True
        return StartTLS()

    def tls_started(self) -> None:
        """The TLS handshake after StartTLS succeeded: haggling goes on, inside TLS."""
        if not self._tls_pending:
            raise errors.ProtocolError("tls_started() without a StartTLS event")
        self._tls_pending = False
        self.tls_active = True
        # nothing negotiated before TLS survives it (CVE-2021-3716): only STARTTLS got through
        self.structured = False

    def _info_or_go(self, option: int, data: bytes):
        """Data: 32 bits name length, name, 16 bits number of requests, 16 bits each."""
        if len(data) < 6:
            return self._option_error(option, NBD_REP_ERR_INVALID, "option data too short")
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > len(data) - 6:
            return self._option_error(option, NBD_REP_ERR_INVALID, "export name length beyond the option data")
        (n_info,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * n_info:
            return self._option_error(option, NBD_REP_ERR_INVALID, "information request count does not match")
        name = _decode_name(data[4:4 + name_len])
        if name is None:
            return self._option_error(option, NBD_REP_ERR_INVALID, "export name is not valid UTF-8 without NUL")
        if not self._known(name):
            return self._option_error(option, NBD_REP_ERR_UNKNOWN, f"no export named {name[:64]!r}")
        wanted = set(struct.unpack_from(f">{n_info}H", data, 6 + name_len))
        e = self.export
        if option == NBD_OPT_GO and e.min_block > 1 and NBD_INFO_BLOCK_SIZE not in wanted:
            return self._option_error(option, NBD_REP_ERR_BLOCK_SIZE_REQD,
                                      f"this export needs requests aligned to {e.min_block} bytes")
        self._option_reply(option, NBD_REP_INFO, INFO_EXPORT.pack(NBD_INFO_EXPORT, e.size,
                                                                  e.transmission_flags(self.structured)))
        if NBD_INFO_NAME in wanted:
            self._option_reply(option, NBD_REP_INFO, struct.pack(">H", NBD_INFO_NAME) + e.name.encode())
        if NBD_INFO_DESCRIPTION in wanted and e.description:
            desc = e.description.encode()[:4096]
            self._option_reply(option, NBD_REP_INFO, struct.pack(">H", NBD_INFO_DESCRIPTION) + desc)
        # block sizes are sent even unasked: a client that did not ask may ignore them
        self._option_reply(option, NBD_REP_INFO, INFO_BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, e.min_block,
                                                                      e.preferred_block, e.max_block))
        self._option_reply(option, NBD_REP_ACK)
        return self._enter_transmission() if option == NBD_OPT_GO else None

    def _known(self, name: str) -> bool:
        return name in ("", self.export.name)

    def _enter_transmission(self) -> Ready:
        self._state = _TRANSMISSION
        self._need = REQUEST.size
        return Ready(self.export, self.structured)

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY.pack(NBD_REP_MAGIC, option, reply, len(data))
        self._out += data

    def _option_error(self, option: int, reply: int, message: str) -> None:
        self._option_reply(option, reply, message.encode()[:4096])

    # -- transmission ---------------------------------------------------------------------------

    def _request(self):
        magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(self._buf, self._start)
        if magic != NBD_REQUEST_MAGIC:
            raise StreamError(f"bad request magic {magic:#x}")
        e = self.export
        if cmd == NBD_CMD_WRITE and length > e.max_block:
            if length > MAX_DISCARD:
                raise StreamError(f"NBD_CMD_WRITE of {length} bytes (limit {e.max_block})")
            self._start += REQUEST.size
            self._discard = length
            self._refused = (NBD_EINVAL, f"write of {length} bytes exceeds max block size {e.max_block}",
                             cmd, handle)
            return None
        total = REQUEST.size + (length if cmd == NBD_CMD_WRITE else 0)
        if self._end - self._start < total:
            self._need = total
            return None
        self._start += REQUEST.size
        data = self._take(length) if cmd == NBD_CMD_WRITE else None
        self._need = REQUEST.size
        if cmd == NBD_CMD_DISC:
            self._state = _CLOSED
            return Closed("NBD_CMD_DISC")
        err = self._check(cmd, flags, offset, length)
        if err is not None:
            self._error_reply(cmd, handle, *err)
            return None
        if length == 0 and cmd != NBD_CMD_FLUSH:
            self.reply_to(cmd, handle)  # nothing to do; a READ of 0 bytes gets no data chunk
            return None
        return Request(cmd, flags, handle, offset, length, data)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        e = self.export
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return NBD_EINVAL, f"unknown or unsupported command {cmd}"
        if cmd == NBD_CMD_READ and not self.structured:
            allowed &= ~NBD_CMD_FLAG_DF
        if flags & ~allowed:
            return NBD_EINVAL, f"command flags {flags:#x} not valid for command {cmd}"
        if cmd == NBD_CMD_FLUSH:
            return (NBD_EINVAL, "NBD_CMD_FLUSH needs offset and length 0") if offset or length else None
        if offset + length > e.size:
            return (NBD_ENOSPC if cmd in _WRITES else NBD_EINVAL,
                    f"offset {offset} length {length} is beyond the export size {e.size}")
        if offset % e.min_block or length % e.min_block:
            return NBD_EINVAL, f"offset {offset} length {length} not aligned to {e.min_block} bytes"
        if cmd == NBD_CMD_READ and length > e.max_block:
            err = NBD_EOVERFLOW if flags & NBD_CMD_FLAG_DF else NBD_EINVAL
            return err, f"read of {length} bytes exceeds max block size {e.max_block}"
        return None

    # -- replies --------------------------------------------------------------------------------

    @property
    def read_header_size(self) -> int:
        """Bytes in front of the data of a successful READ reply."""
        return OFFSET_DATA.size if self.structured else SIMPLE_REPLY.size

    def pack_read_header(self, buf, request: Request) -> int:
        """Write the header of a successful READ reply at buf[0:]; the data follows it."""
        if self.structured:
            OFFSET_DATA.pack_into(buf, 0, NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                  NBD_REPLY_TYPE_OFFSET_DATA, request.handle, 8 + request.length, request.offset)
            return OFFSET_DATA.size
        SIMPLE_REPLY.pack_into(buf, 0, NBD_SIMPLE_REPLY_MAGIC, 0, request.handle)
        return SIMPLE_REPLY.size

    def reply(self, request: Request, error: int = 0, message: str = "") -> None:
        """Queue the reply to a non-READ request, or the error reply to any request."""
        if error:
            self._error_reply(request.command, request.handle, error, message, request.offset)
        else:
            self.reply_to(request.command, request.handle)

    def reply_to(self, cmd: int, handle: int) -> None:
        if cmd == NBD_CMD_READ and self.structured:
            self._out += STRUCTURED_REPLY.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                               NBD_REPLY_TYPE_NONE, handle, 0)
        else:
            self._out += SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle)

    def _error_reply(self, cmd: int, handle: int, error: int, message: str, offset: int | None = None) -> None:
        if not (cmd == NBD_CMD_READ and self.structured):
            self._out += SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle)
            return
        msg = message.encode()[:4096]
        if offset is None:
            payload = ERROR_CHUNK.pack(error, len(msg)) + msg
            kind = NBD_REPLY_TYPE_ERROR
        else:  # the read was valid but failed: say where
            payload = ERROR_CHUNK.pack(error, len(msg)) + msg + struct.pack(">Q", offset)
            kind = NBD_REPLY_TYPE_ERROR_OFFSET
        self._out += STRUCTURED_REPLY.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, kind, handle,
                                           len(payload))
        self._out += payload


def _decode_name(data) -> str | None:
    try:
        name = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in name else name
