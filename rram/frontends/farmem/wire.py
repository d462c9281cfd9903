"""The far-memory control channel: JSON lines over a Unix stream socket, fds by SCM_RIGHTS.

The region's process sends ``hello`` (with the userfaultfd, the memfd and the write end of
the lifeline pipe attached) and then requests (``stats``, ``prefetch``, ``advise``,
``close``); the handler answers each with one line ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``.  Lines are at most ``MAX_LINE`` bytes.
"""
from __future__ import annotations

import json
import socket

from ... import errors

MAX_LINE = 1 << 16
#: fds attached to hello, in this order
HELLO_FDS = ("uffd", "memfd", "lifeline")


def prefetch_range(msg: dict, npages: int, page_size: int) -> tuple[int, int]:
    """Pages [first, last) of a ``prefetch`` request's ``offset`` and ``length`` (bytes), clipped
    to the region (empty when last <= first); ProtocolError when either is not an integer."""
    offset, length = msg.get("offset"), msg.get("length")
    for name, value in (("offset", offset), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.ProtocolError(f"prefetch {name} must be an integer, got {value!r:.40}")
    return max(0, min(npages, offset // page_size)), max(0, min(npages, -(-(offset + length) // page_size)))


def send(sock: socket.socket, msg: dict, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


class Reader:
    """Splits the stream into messages; fds that arrived with a message come with it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    def recv(self) -> tuple[dict | None, list[int]]:
        """The next message and its fds; (None, []) at end of stream."""
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise errors.ProtocolError(f"far-memory control line longer than {MAX_LINE} bytes")
            data, fds, _, _ = socket.recv_fds(self.sock, MAX_LINE, 8)
            self.fds += fds
            if not data:
                return None, []
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        fds, self.fds = self.fds, []
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise errors.ProtocolError(f"far-memory control line is not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise errors.ProtocolError("far-memory control message is not an object")
        return msg, fds

    def pending(self) -> bool:
        return b"\n" in self.buf
